"""memprop: where PyTorch training memory goes, and how to make a training step fit a budget."""

from __future__ import annotations

__version__ = "0.1.0"

from memprop.errors import BudgetInfeasibleError, MemPropError
from memprop.trace.profile import Profile, profile
from memprop.units import parse_size
from memprop.workload import Workload

__all__ = [
    "BudgetInfeasibleError",
    "MemPropError",
    "Profile",
    "Workload",
    "__version__",
    "parse_size",
    "profile",
]
