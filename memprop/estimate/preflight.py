"""Before a real run: will it fit the device? A fake trace says, at no memory cost.

A real step that does not fit does not fail politely: CUDA raises an out-of-memory error after
the allocator has grown to the device's limit, and the CPU may meet the kernel's OOM killer (a
65536x65536 Linear grew to 19.5 GB resident before being killed). So every command that runs a
step for real (``profile``, ``run``, ``fit --real``, ``sweep --real``) first traces the same
step on fake tensors and refuses, exit 3, when it needs more than the device has available.
"""

from __future__ import annotations

from memprop.devices import get_device
from memprop.errors import OutOfMemoryError
from memprop.units import format_bytes

__all__ = ["refuse_unless_it_fits", "shortfall"]


def shortfall(required_bytes: int, device: str, *, available_bytes: int | None = None,
              how: str = "traced on fake tensors") -> str | None:
    """Why ``required_bytes`` (found ``how``) cannot run on ``device`` now, or None when they
    fit."""
    available = (get_device(device).available_bytes() if available_bytes is None
                 else available_bytes)
    if required_bytes <= available:
        return None
    return (f"needs {format_bytes(required_bytes)} ({how}) and {device} has "
            f"{format_bytes(available)} available")


def refuse_unless_it_fits(required_bytes: int, device: str, what: str, advice: str, *,
                          how: str = "traced on fake tensors") -> None:
    """Raise :class:`OutOfMemoryError` (exit 3) when ``what`` would not fit ``device``."""
    reason = shortfall(required_bytes, device, how=how)
    if reason is not None:
        raise OutOfMemoryError(f"{what} {reason}: nothing was run; {advice}")
