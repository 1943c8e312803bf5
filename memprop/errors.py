"""Every error memprop raises on purpose, and the exit code the command line gives it.

The CLI maps these to exit codes in exactly one place (``memprop_cli.main``): a ``MemPropError``
is a clear one-line message for the user, never a traceback. Anything else is a bug (exit 1).
"""

from __future__ import annotations

__all__ = [
    "BudgetExceededError",
    "BudgetInfeasibleError",
    "DeviceUnavailableError",
    "MemPropError",
    "ModelError",
    "OutOfMemoryError",
    "PlanCheckError",
    "PlanMismatchWarning",
    "UsageError",
    "WorkloadError",
]

EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3


class MemPropError(Exception):
    """Base of every error memprop raises on purpose."""

    exit_code: int = EXIT_BAD_INPUT


class UsageError(MemPropError, ValueError):
    """An argument is malformed: a size that does not parse, a strategy that does not exist."""


class WorkloadError(MemPropError):
    """A user's workload cannot be loaded or run: a bad ``--model`` spec, a factory that fails."""


class ModelError(WorkloadError):
    """The user's model, loss or optimizer failed, or gives nothing to train: an exception in
    its forward (the message names the user's frame; the original is the ``__cause__``), an
    output that does not require grad, a loss that is not a scalar."""


class DeviceUnavailableError(MemPropError):
    """A device was asked for that this machine does not have (``--device cuda`` with no GPU)."""


class BudgetInfeasibleError(MemPropError):
    """No schedule keeps the training peak under the budget.

    ``min_feasible_bytes`` is the smallest budget that would fit, so the caller can say what to ask
    for instead.
    """

    exit_code = EXIT_DOES_NOT_FIT

    def __init__(self, message: str, *, budget_bytes: int, min_feasible_bytes: int) -> None:
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.min_feasible_bytes = min_feasible_bytes


class BudgetExceededError(MemPropError):
    """Real steps under a plan were measured by the allocator above their budget: the budget
    does not hold for this step (kernels' scratch the ledger cannot see, or memory the plan's
    model missed), said in one line with by how much and why."""

    exit_code = EXIT_DOES_NOT_FIT


class OutOfMemoryError(MemPropError):
    """A real run ran out of memory on its device, or would: a fake trace predicted more than
    the device has."""

    exit_code = EXIT_DOES_NOT_FIT


class PlanCheckError(MemPropError):
    """A planned step was traced or measured above its budget: the plan's prediction was wrong,
    or the plan is not what the step runs. memprop accepted a plan it could not keep, which is
    memprop's bug (exit 1), said in one line with what was measured."""

    exit_code = EXIT_BUG


class PlanMismatchWarning(UserWarning):
    """A planned step's traced or measured peak differs from the prediction by more than the
    stated tolerance, within the budget."""
