"""What an all-reduce costs on the backend in use: ``t = alpha + bytes / beta``, fitted to
all-reduces timed on this machine (a launch of the ranks, about three seconds), cached beside
the roofline's rates."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

__all__ = ["AllReduce", "allreduce_model"]

_SIZES = tuple(1 << k for k in range(12, 25, 3))
"""Bytes of the all-reduces timed: 4 KiB to 16 MiB."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AllReduce:
    backend: str
    ranks: int
    alpha_s: float
    """Seconds of an empty all-reduce."""
    bytes_per_s: float

    def seconds(self, nbytes: int) -> float:
        return self.alpha_s + nbytes / self.bytes_per_s

    def describe(self) -> str:
        return (f"all-reduce on {self.backend} across {self.ranks} ranks: "
                f"{self.alpha_s * 1e6:.0f} us + bytes at {self.bytes_per_s / 1e9:.2f} GB/s "
                "(timed on this machine)")


def allreduce_model(backend: str, ranks: int) -> AllReduce:
    """The all-reduce's cost on ``backend`` across ``ranks`` ranks of this machine: read from
    the cache, or timed by a launch and written there."""
    from memprop.plan.costs import machine_key, remembered

    return remembered(f"{machine_key('cpu')}|allreduce {backend} x{ranks}",
                      lambda: asdict(_timed(backend, ranks)), lambda found: AllReduce(**found))


def _timed(backend: str, ranks: int) -> AllReduce:
    from memprop.distribute.launch import spawn

    times = spawn(_timed_allreduces, ranks, backend, ())[0]
    # Least squares of t = alpha + bytes / beta over the sizes timed.
    xs, ys = [float(s) for s in _SIZES], [times[str(s)] for s in _SIZES]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
             / sum((x - mean_x) ** 2 for x in xs))
    slope = max(slope, 1e-12)
    return AllReduce(backend=backend, ranks=ranks,
                     alpha_s=max(0.0, mean_y - slope * mean_x), bytes_per_s=1.0 / slope)


def _timed_allreduces(rank: int, world: int) -> dict[str, float]:
    """The median time of an all-reduce of each size, from this rank."""
    import torch.distributed as dist

    found: dict[str, float] = {}
    for size in _SIZES:
        tensor = torch.ones(size // 4)
        samples = []
        for _ in range(7):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            samples.append(time.perf_counter() - started)
        found[str(size)] = statistics.median(samples[1:])
    return found
