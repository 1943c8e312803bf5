"""The CPU: the process's resident memory from /proc, and the machine's from psutil.

NOTE [ Reading a peak from RSS ]
``VmHWM`` in ``/proc/self/status`` is the resident high-water mark; writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS (Linux >= 4.0). RSS only tracks tensor
memory when freed blocks go back to the kernel: glibc keeps small and mid-sized blocks in its heap
and raises its mmap threshold dynamically, so a freed activation is reused silently and the
second step's peak reads low. ``fix_malloc_threshold()`` pins the threshold (what the environment
variable ``MALLOC_MMAP_THRESHOLD_`` does at start-up), so every large tensor is its own mapping,
returned to the kernel when it dies. The RSS peak still carries the interpreter's own churn and
page rounding: it cross-checks the ledger, it does not replace it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from pathlib import Path
from typing import Any

import psutil

__all__ = ["CpuDevice", "fix_malloc_threshold", "malloc_in_use_bytes"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
# mallopt's parameter number for the mmap threshold (malloc.h: #define M_MMAP_THRESHOLD -3).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024
"""Allocations at least this large are mapped on their own and unmapped when freed."""


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        return None
    return None


def fix_malloc_threshold(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold for this process; False where that is not possible."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


class _MallInfo2(ctypes.Structure):
    # struct mallinfo2 (glibc >= 2.33, malloc.h): ten size_t fields, in this order.
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_in_use_bytes() -> int | None:
    """Bytes glibc's malloc has handed out and not had back now (``mallinfo2``: ``uordblks`` in
    its heap plus ``hblkhd`` in blocks mapped on their own); None without glibc >= 2.33. A third
    opinion on the allocator's count: c10's CPU allocator takes tensor storages from malloc, as
    the interpreter and every library take their own objects."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        mallinfo2 = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


class CpuDevice:
    """The CPU as a memory device: the process's RSS, and the machine's available memory."""

    name = "cpu"

    def reset_peak(self) -> None:
        # Without clear_refs the mark covers the whole process's life: still an upper bound.
        with contextlib.suppress(OSError):
            _CLEAR_REFS.write_text("5")

    def current_bytes(self) -> int:
        value = _status_bytes("VmRSS")
        return value if value is not None else int(psutil.Process().memory_info().rss)

    def peak_bytes(self) -> int:
        value = _status_bytes("VmHWM")
        return value if value is not None else self.current_bytes()

    def available_bytes(self) -> int:
        return int(psutil.virtual_memory().available)

    def describe(self) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        return {
            "type": "cpu",
            "name": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "total_bytes": int(memory.total),
            "available_bytes": int(memory.available),
        }
