"""The planner: which activations to keep and which to recompute so that a training step's peak
fits a memory budget at the least extra compute.

``memprop.plan(model, inputs, budget=...)`` is the public entry point (:func:`memprop.plan.api.
plan`); the top-level package binds that function to the name ``memprop.plan``, so reach this
package's modules with ``from memprop.plan.solvers import solve``, not by attribute.
"""

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
