"""Allocation planning: which node holds which tensors. Pure: data and cost functions in, a `Plan` out."""

from williw.planner.fixed import pipeline_from_cuts
from williw.planner.make import make_plan
from williw.planner.plan import ExcludedNode, NodeAssignment, Plan, load_plan, plan_digest, save_plan
from williw.planner.validate import check_plan, validate_split_plan

__all__ = ["ExcludedNode", "NodeAssignment", "Plan", "check_plan", "load_plan", "make_plan", "pipeline_from_cuts",
           "plan_digest", "save_plan", "validate_split_plan"]
