"""Budgets: a size, a fraction of the device, or by default what the device has free."""

from __future__ import annotations

import re
from dataclasses import dataclass

from memprop.devices import get_device
from memprop.errors import UsageError
from memprop.units import format_bytes, parse_size

__all__ = ["Budget", "resolve_budget"]

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*%\s*$")


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    bytes: int
    source: str
    """How the figure was reached, in words, for the report."""


def resolve_budget(text: str | int | None, device: str = "cpu") -> Budget:
    """``"2GiB"`` is two gibibytes; ``"90%"`` is 90% of the device's total memory; ``None`` is
    what the device has free now (a GPU's free memory from NVML less the CUDA context this
    process will need; the CPU's available memory from psutil)."""
    if isinstance(text, str):
        match = _PERCENT.match(text)
        if match is not None:
            fraction = float(match.group(1)) / 100
            if not 0 < fraction <= 1:
                shown = text.strip() if len(text.strip()) <= 24 else f"{text.strip()[:20]}...%"
                raise UsageError(f"budget {shown!r}: a percentage must be above 0% and at most "
                                 "100%")
            total = int(get_device(device).describe()["total_bytes"])
            return Budget(bytes=int(total * fraction),
                          source=f"{text.strip()} of {device}'s {format_bytes(total)}")
    if text is not None:
        return Budget(bytes=parse_size(text), source="given")
    backend = get_device(device)
    headroom = getattr(backend, "headroom_bytes", None)
    if headroom is not None:
        # Asking CUDA for its free memory creates the context first, so the context is already
        # outside the free figure; this process's cached blocks can be reused by the step.
        return Budget(bytes=int(headroom()),
                      source=f"{device}'s free memory plus this process's allocator reserve "
                             f"({format_bytes(int(headroom()))}); the CUDA context is outside it")
    free = backend.available_bytes()
    return Budget(bytes=free, source=f"{device}'s available memory now ({format_bytes(free)})")
