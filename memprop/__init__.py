"""memprop: where PyTorch training memory goes, and how to make a training step fit a budget.

``memprop.plan`` is the function :func:`memprop.plan.api.plan`, bound over the name of the
package ``memprop.plan``, and ``memprop.distribute`` the function
:func:`memprop.distribute.api.distribute` over its package: typed callers see the functions,
and the packages' modules import as usual (``from memprop.plan.solvers import solve``).
"""

from __future__ import annotations

from memprop._version import __version__
from memprop.distribute.api import distribute
from memprop.errors import BudgetInfeasibleError, MemPropError, PlanMismatchWarning
from memprop.plan.api import plan
from memprop.run import checkpoint
from memprop.trace.profile import Profile, profile
from memprop.units import parse_size
from memprop.workload import Workload

__all__ = [
    "BudgetInfeasibleError",
    "MemPropError",
    "PlanMismatchWarning",
    "Profile",
    "Workload",
    "__version__",
    "checkpoint",
    "distribute",
    "parse_size",
    "plan",
    "profile",
]
