"""The planner: which activations to keep and which to recompute so that a training step's peak
fits a memory budget at the least extra compute.

# NOTE [ memprop.plan is a package and a function ]
``memprop.plan(model, inputs, budget=...)`` is the public entry point, and ``memprop.plan`` is
also this package (``import memprop.plan.solvers`` must keep working). Exporting a function
named ``plan`` from ``memprop/__init__.py`` would shadow the package's attribute, and
``memprop.plan.solvers`` would then fail. Instead the package's module object is made callable:
calling it calls :func:`memprop.plan.api.plan`.
"""

import sys
import types
from typing import Any

from memprop.plan.api import plan
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
    "plan",
    "schedule_ops",
    "simulate",
    "solve",
    "uniform_tree",
]


class _CallablePackage(types.ModuleType):
    """This package, callable as :func:`memprop.plan.api.plan`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Plan:
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
