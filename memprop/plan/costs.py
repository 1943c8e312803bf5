"""What recomputation costs: the planner's three cost models.

- ``roofline`` (the default): an op costs its FLOPs at this machine's measured matmul rate plus
  the bytes it reads and writes at its measured copy rate, ``t = flops / F + bytes / B``, plus
  what a pointwise op takes beyond its bytes on a CPU. It prices what FLOPs alone call free
  (ReLU, BatchNorm, pooling, softmax: memory-bound work that takes most of a recomputation's
  time on a CPU), and it is the same on every run of one machine: the rates and timings are
  measured once and cached (``memprop.calibration``).
- ``flops``: counted floating-point operations (``torch.utils.flop_counter``'s formulas): the
  same plan on every machine, blind to memory-bound work.
- ``measured``: the stages' own times on real steps (a real trace; timings vary from run to
  run, so plans may too).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from memprop.calibration.cache import checked_number, remembered
from memprop.calibration.rates import machine_key
from memprop.errors import UsageError

__all__ = ["COST_MODELS", "DEFAULT_COST_MODEL", "check_cost_model", "mapped_seconds_per_byte",
           "on_fake_tensors"]

COST_MODELS: tuple[str, ...] = ("roofline", "flops", "measured")
DEFAULT_COST_MODEL = "roofline"


def on_fake_tensors(cost_model: str) -> str:
    """The cost model a fake trace prices by in place of ``cost_model``: ``measured`` needs
    real steps' times, which later shapes (planned on fake tensors) do not have."""
    return DEFAULT_COST_MODEL if cost_model == "measured" else cost_model


def check_cost_model(cost_model: str, *, fake: bool = False) -> None:
    """The one check of a cost model (every entry point calls it before tracing): its name, and
    on ``fake`` tensors that it can price them."""
    if cost_model not in COST_MODELS:
        raise UsageError(f"cost model {cost_model!r} does not exist: use one of "
                         f"{', '.join(COST_MODELS)}")
    if fake and cost_model == "measured":
        raise UsageError("cost model 'measured' needs the times of real steps, which fake "
                         "tensors do not have: price by roofline or flops on fake tensors, or "
                         "plan on real tensors")


def mapped_seconds_per_byte(device: str) -> float:
    """What a storage mapped fresh at its birth costs per byte beyond its bytes moved, on this
    machine (NOTE [ Storages the CPU maps fresh ] in ``memprop.trace.stages``): on a CPU,
    measured once (a fresh 64 MiB storage written, less the same write into a kept one) and
    cached with the machine's rates; 0 on a GPU, whose caching allocator reuses its blocks."""
    kind = torch.device(device).type
    if kind != "cpu":
        return 0.0
    return remembered(f"{machine_key(kind)}|mapped", _measure_mapped, _load_mapped)


_MAPPED_PROBE_BYTES = 64 * 2**20
"""Above glibc's largest mmap threshold (32 MiB), so each probe is mapped fresh."""


def _measure_mapped() -> dict[str, float]:
    """The median, over interleaved pairs, of a fresh storage's write less a kept one's: a
    shared machine's other work slows both of a pair alike."""
    elements = _MAPPED_PROBE_BYTES // 4
    kept = torch.empty(elements).fill_(1.0)

    def timed(run: Callable[[], object]) -> float:
        started = time.perf_counter()
        run()
        return time.perf_counter() - started

    differences = [timed(lambda: torch.empty(elements).fill_(1.0)) - timed(lambda: kept.fill_(1.0))
                   for _ in range(7)]
    return {"seconds_per_byte": max(0.0, statistics.median(differences)) / _MAPPED_PROBE_BYTES}


def _load_mapped(found: object) -> float:
    if not isinstance(found, dict):
        raise TypeError(f"the entry is {type(found).__name__}, not an object")
    return checked_number(found.get("seconds_per_byte"), "seconds_per_byte", 0.0, 1e-6)
