"""What communication costs on the backend in use: ``t = alpha + bytes / beta``, fitted to
operations timed on this machine (a launch of the ranks, a few seconds), cached beside the
roofline's rates: the all-reduce of DDP's gradients (and FSDP2's gathers, priced from it), and
the point-to-point send between pipeline stages."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

__all__ = ["AlphaBeta", "Communication", "communication"]

_SIZES = tuple(1 << k for k in range(12, 25, 3))
"""Bytes of the operations timed: 4 KiB to 16 MiB."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AlphaBeta:
    kind: str
    """``all-reduce`` (across ``ranks``) or ``send`` (from one rank to the next)."""
    backend: str
    ranks: int
    alpha_s: float
    """Seconds of an empty operation."""
    bytes_per_s: float

    def seconds(self, nbytes: int) -> float:
        return self.alpha_s + nbytes / self.bytes_per_s

    def describe(self) -> str:
        return (f"{self.kind} on {self.backend} across {self.ranks} ranks: "
                f"{self.alpha_s * 1e6:.0f} us + bytes at {self.bytes_per_s / 1e9:.2f} GB/s")


@dataclass(frozen=True, slots=True)
class Communication:
    allreduce: AlphaBeta
    send: AlphaBeta

    def describe(self) -> str:
        return f"{self.allreduce.describe()}; {self.send.describe()} (timed on this machine)"


def communication(backend: str, ranks: int) -> Communication:
    """The all-reduce across ``ranks`` ranks and the send between two, on ``backend``: read
    from the cache, or timed by a launch each and written there."""
    return Communication(_remembered("all-reduce", backend, ranks),
                         _remembered("send", backend, ranks))


def _remembered(kind: str, backend: str, ranks: int) -> AlphaBeta:
    from memprop.plan.costs import machine_key, remembered

    key = f"{machine_key('cpu')}|{'allreduce' if kind == 'all-reduce' else kind} {backend} x{ranks}"
    return remembered(key, lambda: asdict(_timed(kind, backend, ranks)),
                      lambda found: AlphaBeta(**{"kind": kind, **found}))


def _timed(kind: str, backend: str, ranks: int) -> AlphaBeta:
    from memprop.distribute.launch import spawn

    times = spawn(_timed_operations, ranks, backend, (kind,))[0]
    # Least squares of t = alpha + bytes / beta over the sizes timed.
    xs, ys = [float(s) for s in _SIZES], [times[str(s)] for s in _SIZES]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
             / sum((x - mean_x) ** 2 for x in xs))
    slope = max(slope, 1e-12)
    return AlphaBeta(kind=kind, backend=backend, ranks=ranks,
                     alpha_s=max(0.0, mean_y - slope * mean_x), bytes_per_s=1.0 / slope)


def _timed_operations(rank: int, world: int, kind: str) -> dict[str, float]:
    """The median time of the operation at each size, from rank 0: an all-reduce across the
    ranks, or half a send from rank 0 to rank 1 and back (the others wait, as a pipeline's
    ranks share the machine)."""
    import torch.distributed as dist

    found: dict[str, float] = {}
    for size in _SIZES:
        tensor = torch.ones(size // 4)
        samples = []
        for _ in range(7):
            dist.barrier()
            started = time.perf_counter()
            if kind == "all-reduce":
                dist.all_reduce(tensor)
            elif rank == 0:
                dist.send(tensor, 1)
                dist.recv(tensor, 1)
            elif rank == 1:
                dist.recv(tensor, 0)
                dist.send(tensor, 0)
            samples.append((time.perf_counter() - started) / (1 if kind == "all-reduce" else 2))
        found[str(size)] = statistics.median(samples[1:])
    return found
