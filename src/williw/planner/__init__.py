"""Allocation planning: which node holds which tensors. Pure: data and cost functions in, a `Plan` out."""

from williw.planner.plan import ExcludedNode, NodeAssignment, Plan, load_plan, plan_digest, save_plan

__all__ = ["ExcludedNode", "NodeAssignment", "Plan", "load_plan", "plan_digest", "save_plan"]
