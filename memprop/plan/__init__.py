"""The planner: which activations to keep and which to recompute so that a training step's peak
fits a memory budget at the least extra compute."""

from memprop.plan.chain import Chain, Stage
from memprop.plan.schedule import Segment, Simulation, schedule_ops, simulate
from memprop.plan.solvers import Plan, min_feasible_bytes, solve, uniform_tree

__all__ = [
    "Chain",
    "Plan",
    "Segment",
    "Simulation",
    "Stage",
    "min_feasible_bytes",
    "schedule_ops",
    "simulate",
    "solve",
    "uniform_tree",
]
