"""Allocation planning: which node holds which tensors. Pure: data and cost functions in, a `Plan` out."""

from williw.planner.fixed import pipeline_from_cuts
from williw.planner.make import make_plan
from williw.planner.migrate import MODEL_SOURCE, MigrationSchedule, MigrationStep, NodeMigration, migration_schedule
from williw.planner.plan import ExcludedNode, NodeAssignment, Plan, load_plan, plan_digest, save_plan
from williw.planner.replan import Replan, replan
from williw.planner.validate import check_plan, validate_split_plan

__all__ = ["MODEL_SOURCE", "ExcludedNode", "MigrationSchedule", "MigrationStep", "NodeAssignment", "NodeMigration",
           "Plan", "Replan", "check_plan", "load_plan", "make_plan", "migration_schedule", "pipeline_from_cuts",
           "plan_digest", "replan", "save_plan", "validate_split_plan"]
