"""What communication costs, for a world of any size, without launching it.

NOTE [ Pricing collectives by their algorithm ]
A collective over ``N`` ranks is priced by the algorithm that runs it, each of its steps one
message between two neighbouring ranks costing ``latency + bytes / bandwidth`` (the link):

- a ring all-reduce of ``B`` bytes: ``2 (N-1)`` steps, each moving ``B / N``: ``2 (N-1) latency
  + 2 (N-1)/N B / bandwidth`` (a reduce-scatter, then an all-gather);
- an all-gather or a reduce-scatter (``B`` the gathered whole): ``(N-1) latency + (N-1)/N B /
  bandwidth``;
- a send between pipeline stages: one message, ``latency + B / bandwidth``.

The link is given (``link=(GB/s, us)``: the interconnect of the machines planned for), or fitted
here: an all-reduce timed across as many ranks as this machine has cores (two at least, a few
seconds' launch), ``t = a + b B`` by least squares, solved for the ring's latency and bandwidth;
the send timed between two ranks. Both cached beside the roofline's rates. A world of 4096 ranks
is priced from those, never launched.

NOTE [ A pipeline action's own cost ]
Every forward or backward action of a pipeline stage costs more than the stage's compute:
torch's runtime posts its receives and sends, waits on them, detaches and checks what it
receives, runs the stage's autograd call, and the action-list runtime of the looped schedules
(``Interleaved1F1B``, ``LoopedBFS``) walks a longer list than the single-stage one of
``GPipe`` and ``1F1B``. That cost is timed once a machine and backend, for each schedule, as
the step of that schedule over two ranks whose stages are one ``Linear(4, 4)`` each (compute
next to nothing), divided by the actions on its critical path, found by the schedule's own
simulation with every action one unit (``critical_actions``): ``2 (M + 1)`` for GPipe and
1F1B on two stages. Cached beside the links.

Known limitations: gloo picks its own algorithm by size (ring, halving-doubling), NCCL rings and
trees; the ring is the model, and a link timed between processes of one machine is that
machine's memory, not a network.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from memprop.errors import UsageError

__all__ = ["Communication", "Link", "communication", "parse_link"]

_SIZES = tuple(1 << k for k in range(12, 25, 3))
"""Bytes of the operations timed: 4 KiB to 16 MiB."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """One message between two ranks: ``latency_s + bytes / bytes_per_s``."""

    latency_s: float
    bytes_per_s: float

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s

    @classmethod
    def from_cached(cls, found: Any) -> Link:
        """A cached link, refused (``ValueError``, ``TypeError``) unless plausible (NOTE [ A
        cache is input ] in ``memprop.calibration.cache``)."""
        from memprop.calibration.cache import checked_number

        if not isinstance(found, dict):
            raise TypeError(f"a link is {type(found).__name__}, not an object")
        return cls(latency_s=checked_number(found.get("latency_s"), "latency_s", 0.0, 10.0),
                   bytes_per_s=checked_number(found.get("bytes_per_s"), "bytes_per_s", 1e3,
                                              1e15))

    def describe(self) -> str:
        return f"{self.bytes_per_s / 1e9:.2f} GB/s, {self.latency_s * 1e6:.0f} us a message"


@dataclass(frozen=True, kw_only=True, slots=True)
class Communication:
    """The collectives of a world of ``ranks``, priced by their algorithm (NOTE [ Pricing
    collectives by their algorithm ])."""

    ranks: int
    ring: Link
    """A step of a ring all-reduce."""
    gather: Link
    """A step of a ring all-gather (FSDP2's parameters)."""
    scatter: Link
    """A step of a ring reduce-scatter (FSDP2's gradients)."""
    send: Link
    """A send between two pipeline stages."""
    source: str
    """Where the links come from: given, or timed here (across how many ranks)."""

    @property
    def timed_here(self) -> bool:
        """Whether the links are this machine's (not a ``--link`` given for another)."""
        return self.source != _GIVEN

    def allreduce_s(self, nbytes: int) -> float:
        n = self.ranks
        return 0.0 if n < 2 else 2 * (n - 1) * self.ring.latency_s + (
            2 * (n - 1) / n * nbytes / self.ring.bytes_per_s)

    def allgather_s(self, nbytes: int) -> float:
        """An all-gather of ``nbytes`` in all."""
        return _half_ring(self.ranks, self.gather, nbytes)

    def reduce_scatter_s(self, nbytes: int) -> float:
        """A reduce-scatter of ``nbytes`` in all."""
        return _half_ring(self.ranks, self.scatter, nbytes)

    def describe(self) -> str:
        n = self.ranks
        return (f"communication across {n} ranks by the ring's algorithm: an all-reduce "
                f"2(N-1)/N of its bytes and 2(N-1) messages, an all-gather or reduce-scatter "
                f"(N-1)/N and N-1 (N = {n}), a message {self.ring.describe()} (all-reduce), "
                f"{self.gather.describe()} (all-gather), {self.scatter.describe()} "
                f"(reduce-scatter); a send between stages {self.send.describe()} "
                f"({self.source})")


_GIVEN = "link given"


def _half_ring(ranks: int, link: Link, nbytes: int) -> float:
    """An all-gather or reduce-scatter on a ring: N-1 messages of 1/N of the bytes each."""
    if ranks < 2:
        return 0.0
    return (ranks - 1) * link.latency_s + (ranks - 1) / ranks * nbytes / link.bytes_per_s


def parse_link(text: str) -> tuple[float, float]:
    """``"GB/s,us"`` (``"100,5"``: 100 GB/s, 5 us a message) as (bytes per second, seconds)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        rate, latency = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--link {text!r}: give GB/s,us (say 100,5: 100 GB/s and 5 us a "
                         "message)") from None
    if not (0 < rate < float("inf")) or not (0 <= latency < float("inf")):
        raise UsageError(f"--link {text!r}: the bandwidth must be positive and the latency "
                         "at least 0, both finite")
    return rate * 1e9, latency * 1e-6


def timed_ranks(devices: int) -> int:
    """Ranks a timing launch uses for a world of ``devices``: no more than the cores."""
    from memprop.distribute.launch import available_cores

    return max(2, min(devices, available_cores()))


def communication(backend: str, ranks: int, link: tuple[float, float] | None = None
                  ) -> Communication:
    """The collectives of ``ranks`` ranks: over ``link`` (bytes per second, seconds a message)
    when given, else over the links timed on this machine's ``backend`` (cached)."""
    if link is not None:
        given = Link(latency_s=link[1], bytes_per_s=link[0])
        return Communication(ranks=ranks, ring=given, gather=given, scatter=given, send=given,
                             source=_GIVEN)
    timed = timed_ranks(ranks)
    return Communication(
        ranks=ranks, ring=_remembered("ring", backend, timed),
        gather=_remembered("all-gather", backend, timed),
        scatter=_remembered("reduce-scatter", backend, timed),
        send=_remembered("send", backend, 2),
        source=f"fitted to each collective timed across {timed} ranks, and a send, on "
               f"{backend} on this machine")


def _remembered(kind: str, backend: str, ranks: int) -> Link:
    from memprop.calibration.cache import remembered
    from memprop.calibration.rates import machine_key

    key = f"{machine_key('cpu')}|link {kind} {backend} x{ranks}"
    return remembered(key, lambda: asdict(_timed(kind, backend, ranks)),
                      Link.from_cached)


def _timed(kind: str, backend: str, ranks: int) -> Link:
    """The link of ``kind`` (``ring``: solved from a timed all-reduce; ``all-gather``,
    ``reduce-scatter``: from themselves; ``send``) from a launch of ``ranks`` ranks."""
    from memprop.distribute.launch import spawn

    times = spawn(_timed_operations, ranks, backend, (kind,))[0]
    # Least squares of t = a + b bytes over the sizes timed.
    xs, ys = [float(s) for s in _SIZES], [times[str(s)] for s in _SIZES]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
             / sum((x - mean_x) ** 2 for x in xs))
    slope = max(slope, 1e-12)
    intercept = max(0.0, mean_y - slope * mean_x)
    if kind == "send":
        return Link(latency_s=intercept, bytes_per_s=1.0 / slope)
    # The ring: t = s latency + s/n bytes / bandwidth, s = 2(n-1) steps for an all-reduce,
    # n-1 for the others.
    steps = 2 * (ranks - 1) if kind == "ring" else ranks - 1
    return Link(latency_s=intercept / steps, bytes_per_s=steps / ranks / slope)


def _timed_operations(rank: int, world: int, kind: str) -> dict[str, float]:
    """The median time of the operation at each size (its bytes in all), from rank 0: a
    collective across the ranks, or half a send from rank 0 to rank 1 and back."""
    import torch.distributed as dist

    found: dict[str, float] = {}
    for size in _SIZES:
        tensor = torch.ones(size // 4)
        part = torch.ones(size // 4 // world)
        samples = []
        for _ in range(7):
            dist.barrier()
            started = time.perf_counter()
            if kind == "ring":
                dist.all_reduce(tensor)
            elif kind == "all-gather":
                dist.all_gather_into_tensor(tensor, part)
            elif kind == "reduce-scatter":
                dist.reduce_scatter_tensor(part, tensor)
            elif rank == 0:
                dist.send(tensor, 1)
                dist.recv(tensor, 1)
            elif rank == 1:
                dist.recv(tensor, 0)
                dist.send(tensor, 0)
            samples.append((time.perf_counter() - started) / (2 if kind == "send" else 1))
        found[str(size)] = statistics.median(samples[1:])
    return found



PIPELINE_MICROBATCHES = 8
PIPELINE_STEPS = 40
"""Steps of each schedule timed (the fastest taken): enough for one the machine's other work
did not interrupt."""


def pipeline_action_s(backend: str, schedule: str = "GPipe") -> float:
    """What torch's pipeline runtime adds to each forward or backward action of a stage under
    ``schedule`` (its Python, the schedule's bookkeeping, the stage's own autograd call, the
    posting of and waits on its sends and receives), beyond the stage's compute and the
    transfers (NOTE [ A pipeline action's own cost ])."""
    from memprop.calibration.cache import remembered
    from memprop.calibration.rates import machine_key

    def timed() -> dict[str, float]:
        from memprop.distribute.launch import spawn

        steps = spawn(_timed_pipelines, 2, backend, ())[0]
        return {name: action_s(float(steps[name]), critical_actions(name, 2,
                                                                      PIPELINE_MICROBATCHES))
                for name in steps}

    actions = remembered(f"{machine_key('cpu')}|pipeline actions {backend}", timed,
                         _checked_actions)
    return actions.get(schedule, actions["GPipe"])


def _checked_actions(found: Any) -> dict[str, float]:
    """A cached table of per-action costs, refused unless every figure is plausible (NOTE
    [ A cache is input ] in ``memprop.calibration.cache``)."""
    from memprop.calibration.cache import checked_number
    from memprop.distribute.pipeline import SCHEDULES

    if not isinstance(found, dict) or set(found) != set(SCHEDULES):
        raise ValueError(f"pipeline actions: expected one figure for each of "
                         f"{', '.join(SCHEDULES)}")
    return {name: checked_number(found[name], f"pipeline action {name}", 0.0, 10.0)
            for name in SCHEDULES}


def critical_actions(schedule: str, ranks: int, microbatches: int) -> float:
    """The actions on the critical path of a step of ``schedule`` whose every action takes one
    unit and whose sends take none: the schedule's own simulation (``simulated_seconds``) on
    one stage per item."""
    from memprop.distribute import pipeline as pp

    stages = ranks * pp.SCHEDULES[schedule]
    shape = pp.PipelineShape(schedule=schedule, ranks=ranks, microbatches=microbatches,
                             bounds=tuple(range(stages + 1)))
    return pp.simulated_seconds(shape, [1.0] * stages, [1.0] * stages, lambda _: 0.0,
                                [0] * (stages + 1))


def action_s(step_s: float, critical: float) -> float:
    """A timed step of actions that compute almost nothing, over the actions on its critical
    path: what one action costs."""
    return max(0.0, step_s) / critical


def _timed_pipelines(rank: int, world: int) -> dict[str, float]:
    """Rank 0's fastest step of each schedule, on stages of one ``Linear(4, 4)`` each (as many
    a rank as the schedule places there): the runtime with next to no compute."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import get_schedule_class

    from memprop.distribute.pipeline import SCHEDULES, placement

    found = {}
    inputs = torch.ones(PIPELINE_MICROBATCHES, 4)
    for name, per_rank in SCHEDULES.items():
        torch.manual_seed(0)
        stages = [PipelineStage(torch.nn.Linear(4, 4), s, world * per_rank, torch.device("cpu"))
                  for s in placement(name, world)[rank]]
        schedule = get_schedule_class(name)(stages[0] if per_rank == 1 else stages,
                                            n_microbatches=PIPELINE_MICROBATCHES,
                                            loss_fn=lambda output, target: output.sum())
        first, last = 0 in placement(name, world)[rank], world * per_rank - 1 in placement(
            name, world)[rank]
        samples = []
        for _ in range(PIPELINE_STEPS):  # as many on both ranks: their messages pair up
            started = time.perf_counter()
            arguments = (inputs,) if first else ()
            if last:
                schedule.step(*arguments, target=inputs, losses=[])
            else:
                schedule.step(*arguments)
            samples.append(time.perf_counter() - started)
        found[name] = min(samples[2:])
    return found
