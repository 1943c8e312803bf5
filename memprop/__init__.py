"""memprop: where PyTorch training memory goes, and how to make a training step fit a budget."""

from __future__ import annotations

__version__ = "0.1.0"

# memprop.plan is the package, made callable: NOTE [ memprop.plan is a package and a function ]
from memprop import plan
from memprop.errors import BudgetInfeasibleError, MemPropError
from memprop.run import checkpoint
from memprop.trace.profile import Profile, profile
from memprop.units import parse_size
from memprop.workload import Workload

__all__ = [
    "BudgetInfeasibleError",
    "MemPropError",
    "Profile",
    "Workload",
    "__version__",
    "checkpoint",
    "parse_size",
    "plan",
    "profile",
]
