"""Every error memprop raises on purpose, and the exit code the command line gives it.

The CLI maps these to exit codes in exactly one place (``memprop_cli.main``): a ``MemPropError``
is a clear one-line message for the user, never a traceback. Anything else is a bug (exit 1).
"""

from __future__ import annotations

__all__ = [
    "BudgetInfeasibleError",
    "DeviceUnavailableError",
    "MemPropError",
    "OutOfMemoryError",
    "UsageError",
    "WorkloadError",
]

EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3


class MemPropError(Exception):
    """Base of every error memprop raises on purpose."""

    exit_code: int = EXIT_BAD_INPUT


class UsageError(MemPropError, ValueError):
    """An argument is malformed: a size that does not parse, a strategy that does not exist."""


class WorkloadError(MemPropError):
    """A user's workload cannot be loaded or run: a bad ``--model`` spec, a factory that fails."""


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


class OutOfMemoryError(MemPropError):
    """A real run ran out of memory on its device."""

    exit_code = EXIT_DOES_NOT_FIT
