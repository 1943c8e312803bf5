"""How long a rank's step takes: the roofline's prices, calibrated by real steps of the workload
timed once on this machine.

NOTE [ Calibrating the roofline on the workload ]
The roofline (``memprop.plan.costs``) prices FLOPs and bytes at rates measured on large
operations; what it cannot derive is what a real step adds or saves around them: the Python of
every module call, autograd's engine, small matmuls far from the large one's rate, threads, and
the optimizer's step, which the chain does not hold. So, once per workload, real unplanned
steps are timed in this process, with the thread count a rank gets (one share of the cores),
at up to three of the microbatch sizes the candidates use (the smallest, the largest and one
between, each only if its predicted peak and time are small enough to run here), and the
forward and backward time fitted as ``p + q R(m)``, ``R(m)`` the roofline's price of that
microbatch's step: ``p`` is what a microbatch costs whatever its size (the per-module
overhead), ``q`` scales the roofline's rates to what this workload reaches. Every price the
candidates are made of (a microbatch's compute, a plan's recomputation, a pipeline stage's
forward and backward) is multiplied by ``(p + q R(m)) / R(m)``; the optimizer's step, timed
alone, is added once a step (FSDP2: its share of the parameters). The model's error is the
largest relative miss of the fit over the sizes timed, or of the median step over the
fastest (what the machine's other work does to a step), whichever is larger: a choice whose
predicted margin is within it says so. Every time is the fastest of several steps
(``LEAST_TIMED_STEPS`` at least, more for ``TIMING_S``; as ``--run`` takes its own): the
machine's, the least disturbed by other work on its cores. A larger size is timed only when
the smallest's step, scaled by the roofline, says it takes under ``STEP_S``.

NOTE [ Ranks that share a machine ]
The calibration times one rank alone, with its share of the cores. When the ranks really run
on this machine (``--run``), they step at once: each contends with the others for the memory
bandwidth and caches, with gloo's threads, and with whatever else runs on the machine. That
is measured, not assumed: one launch of the ranks that ``--run`` starts times a microbatch's
step on rank 0 alone (the others waiting, as they do while a one-device candidate runs), then
on every rank at once, ``TOGETHER_ROUNDS`` times alternately; ``together / alone`` (the
slowest rank's fastest step at once over rank 0's fastest alone) multiplies the predicted
step of every candidate on several ranks. On a quiet machine with no more ranks than cores
it is near 1; on one busy with other work it is what that work takes from the ranks.

Known limitations: sizes too large to run here are extrapolated along the roofline (their
microbatches priced by the fit's ``p`` and ``q``); a workload that cannot run here at all
(its state alone over ``CALIBRATION_BYTES``) is priced by the roofline alone, and said. The
contention of ranks at once is measured only with ``--run`` (a prediction alone prices
dedicated devices), at one microbatch size, and the machine's other work may change between
that launch and the candidates' own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from memprop.workload import Workload

__all__ = ["CALIBRATION_BYTES", "Calibration", "Together", "calibrate", "timed_together"]

CALIBRATION_BYTES = 1 << 30
"""The most a timed step may hold (its predicted peak), or a quarter of the memory free."""
CALIBRATION_S = 0.5
"""The most the roofline may price a timed microbatch at (a few of them run)."""
LEAST_TIMED_STEPS = 3
"""Steps timed at each size, at least (after one that makes the optimizer's state)..."""
MOST_TIMED_STEPS = 40
"""... and more, up to this many, until ``TIMING_S`` have passed: the fastest is then one
that the machine's other work did not interrupt."""
TIMING_S = 0.3
STEP_S = 0.5
"""A larger size is timed only if its step is expected within this (from the smallest's)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Calibration:
    """``forward and backward of a microbatch = p + q R(m)``, and the optimizer's step."""

    fixed_s: float
    """``p``: seconds a microbatch takes whatever its size."""
    scale: float
    """``q``: the roofline's seconds to real ones."""
    optimizer_s: float
    """One optimizer step over all the parameters."""
    error: float
    """The fit's largest relative miss over the sizes timed, or the timings' spread."""
    threads: int
    sizes: tuple[int, ...]
    """Microbatch sizes timed (empty: not calibrated)."""
    why_not: str = ""
    """Why nothing was timed (the roofline alone prices the steps)."""
    together: Together | None = None
    """Ranks stepping at once on this machine against one alone, when measured (NOTE
    [ Ranks that share a machine ])."""

    def on_ranks(self, step_s: float, devices: int) -> float:
        """A candidate's predicted step on ``devices`` ranks, as they run at once here."""
        if devices < 2 or self.together is None:
            return step_s
        return step_s * self.together.factor

    def factor(self, roofline_s: float) -> float:
        """What to multiply a microbatch's roofline prices by, the microbatch priced at
        ``roofline_s`` unplanned."""
        if roofline_s <= 0:
            return 1.0
        return (self.fixed_s + self.scale * roofline_s) / roofline_s

    def describe(self) -> str:
        if not self.sizes:
            return f"step times at the roofline's rates alone ({self.why_not})"
        return (f"step times calibrated on real steps of this workload timed here with "
                f"{self.threads} thread{'s' if self.threads > 1 else ''} a rank (microbatches "
                f"of {', '.join(map(str, self.sizes))}): {self.fixed_s * 1e3:.2f} ms a "
                f"microbatch + {self.scale:.2f}x the roofline, the optimizer's step "
                f"{self.optimizer_s * 1e3:.2f} ms; the model's error {self.error:.0%}"
                + ("" if self.together is None else "; " + self.together.describe()))


@dataclass(frozen=True, kw_only=True, slots=True)
class Together:
    """A microbatch's step timed on rank 0 alone and on every rank at once, in one launch
    (NOTE [ Ranks that share a machine ])."""

    ranks: int
    size: int
    """The microbatch's samples."""
    alone_s: float
    """Rank 0's fastest step alone."""
    together_s: float
    """The slowest rank's fastest step with every rank stepping."""

    @property
    def factor(self) -> float:
        return self.together_s / self.alone_s if self.alone_s > 0 else 1.0

    def describe(self) -> str:
        return (f"{self.ranks} ranks stepping at once here take {self.factor:.2f}x one alone "
                f"(microbatches of {self.size}, {self.together_s * 1e3:.2f} against "
                f"{self.alone_s * 1e3:.2f} ms), and the candidates on several ranks are priced "
                "so")


TOGETHER_ROUNDS = 2
"""Alternations of rank 0 alone and every rank at once."""


def together_of(ranks: int, size: int, alone: Sequence[float],
                together: Sequence[Sequence[float]]) -> Together:
    """``alone``: rank 0's fastest step of each round alone; ``together[r]``: rank ``r``'s of
    each round with every rank stepping. A step at once waits for the slowest rank: the
    slowest rank's fastest round, against rank 0's fastest alone."""
    return Together(ranks=ranks, size=size, alone_s=min(alone),
                    together_s=max(min(rounds) for rounds in together))


def timed_together(calibration: Calibration, factory: Callable[[int], object], ranks: int,
                   backend: str) -> Calibration:
    """``calibration`` with the contention of ``ranks`` ranks stepping at once here (NOTE
    [ Ranks that share a machine ]), timed on the middle of its sizes; as it was when
    nothing was calibrated. A launch that fails or is stopped (Ctrl-C) raises as the
    candidates' own would: the user's signal and a factory that fails on a rank are theirs to
    see, not a reason to go on to the next launch."""
    if ranks < 2 or not calibration.sizes:
        return calibration
    from memprop.distribute.launch import spawn

    size = calibration.sizes[len(calibration.sizes) // 2]
    found = spawn(_steps_together, ranks, backend, (factory, size))
    return dataclasses.replace(calibration, together=together_of(
        ranks, size, found[0]["alone"], [r["together"] for r in found]))


def _steps_together(rank: int, world: int, factory: Callable[[int], object], size: int
                    ) -> dict[str, list[float]]:
    """Rank 0's step alone (the others at a barrier), then every rank's at once, in turn."""
    import torch.distributed as dist

    # Every rank builds its workload first: building is not stepping, and a factory that
    # waits for its ranks (a collective of its own) must find all of them there.
    workload = _built(factory, size)
    alone: list[float] = []
    together: list[float] = []
    for _ in range(TOGETHER_ROUNDS):
        dist.barrier()
        if rank == 0:
            alone.append(sum(_timed_steps(workload)[:2]))
        dist.barrier()
        together.append(sum(_timed_steps(workload)[:2]))
    return {"alone": alone, "together": together}


UNCALIBRATED = Calibration(fixed_s=0.0, scale=1.0, optimizer_s=0.0, error=0.0, threads=1,
                           sizes=(), why_not="not asked")


def calibrate(factory: Callable[[int], object], sizes: Sequence[int],
              roofline_s: Callable[[int], float], peak_bytes: Callable[[int], int],
              threads: int) -> Calibration:
    """Time real unplanned steps of ``factory(m)`` at up to three of ``sizes`` (NOTE
    [ Calibrating the roofline on the workload ]); ``roofline_s(m)`` and ``peak_bytes(m)``
    are a microbatch's predicted seconds and peak."""
    cap = _memory_cap()
    fitting = sorted(m for m in set(sizes)
                     if peak_bytes(m) <= cap and roofline_s(m) <= CALIBRATION_S)
    if not fitting:
        smallest = min(sizes)
        return _uncalibrated(threads, (
            f"the smallest microbatch, of {smallest}, is predicted at "
            f"{peak_bytes(smallest) / 2**20:.0f} MiB and {roofline_s(smallest):.2f} s: over "
            f"what is timed here ({cap / 2**20:.0f} MiB, {CALIBRATION_S} s)"))
    timed: list[float] = []
    optimizer: list[float] = []
    chosen: list[int] = []
    spreads: list[float] = []
    with _threads(threads):
        for size in sorted({fitting[0], fitting[len(fitting) // 2], fitting[-1]}):
            # The smallest's real forward and backward, scaled by the roofline, and the
            # optimizer's step as it was (it does not grow with the microbatch): too long to time?
            scaled = timed[0] * roofline_s(size) / roofline_s(chosen[0]) if chosen else 0.0
            if chosen and scaled + optimizer[0] > STEP_S:
                break
            seconds, optimizer_s, spread = _timed_step(factory, size)
            spreads.append(spread)
            chosen.append(size)
            timed.append(seconds)
            optimizer.append(optimizer_s)
    priced = [roofline_s(m) for m in chosen]
    fixed, scale = _fit(priced, timed)
    misses = [abs(fixed + scale * r - t) / t for r, t in zip(priced, timed, strict=True)]
    return Calibration(fixed_s=fixed, scale=scale, optimizer_s=statistics.median(optimizer),
                       error=max(*misses, *spreads),
                       threads=threads, sizes=tuple(chosen))


def _uncalibrated(threads: int, why: str) -> Calibration:
    return Calibration(fixed_s=0.0, scale=1.0, optimizer_s=0.0, error=0.0,
                       threads=threads, sizes=(), why_not=why)


def _fit(priced: list[float], timed: list[float]) -> tuple[float, float]:
    """Least squares of ``timed = p + q priced``, with ``p, q >= 0``; one size: ``q`` alone."""
    if len(priced) == 1 or max(priced) - min(priced) <= 1e-12:
        return 0.0, statistics.fmean(timed) / max(statistics.fmean(priced), 1e-12)
    mean_x, mean_y = statistics.fmean(priced), statistics.fmean(timed)
    scale = (sum((x - mean_x) * (y - mean_y) for x, y in zip(priced, timed, strict=True))
             / sum((x - mean_x) ** 2 for x in priced))
    fixed = mean_y - scale * mean_x
    if scale <= 0:  # noise over too narrow a range of sizes: the ratio alone
        return 0.0, mean_y / mean_x
    if fixed < 0:
        return 0.0, sum(x * y for x, y in zip(priced, timed, strict=True)) / sum(
            x * x for x in priced)
    return fixed, scale


def _timed_step(factory: Callable[[int], object], size: int) -> tuple[float, float, float]:
    """The forward and backward of a real unplanned microbatch of ``size`` samples and the
    optimizer's step, from the fastest of whole steps as a rank runs them (the gradients freed,
    the microbatch, the optimizer's step): the machine's own time, the least disturbed by other
    work on its cores (as ``--run`` takes its steps' times); and how far the median step is
    above the fastest (relative): what the machine's other work does to one step."""
    return _timed_steps(_built(factory, size))


def _built(factory: Callable[[int], object], size: int) -> Workload:
    """The factory's workload of ``size`` samples, built from seed 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        workload = factory(size)
    assert isinstance(workload, Workload)
    return workload


def _timed_steps(workload: Workload) -> tuple[float, float, float]:
    """:func:`_timed_step` of a built workload."""
    from memprop.loop import compute_loss
    from memprop.trace.caches import without_caches

    with torch.random.fork_rng(devices=[]):
        model, optimizer = workload.model, workload.optimizer
        whole: list[float] = []
        stepping: list[float] = []
        with without_caches(model):
            began = time.perf_counter()
            while len(whole) < LEAST_TIMED_STEPS + 1 or (
                    len(whole) < MOST_TIMED_STEPS and time.perf_counter() - began < TIMING_S):
                started = time.perf_counter()
                for parameter in model.parameters():
                    parameter.grad = None
                loss, _ = compute_loss(workload, workload.forward())
                loss.backward()
                del loss
                middle = time.perf_counter()
                if optimizer is not None:
                    optimizer.step()
                ended = time.perf_counter()
                whole.append(ended - started)
                stepping.append(ended - middle)
    whole, stepping = whole[1:], stepping[1:]  # the first makes the optimizer's state
    fastest = min(whole)
    optimizer_s = stepping[whole.index(fastest)]
    return fastest - optimizer_s, optimizer_s, statistics.median(whole) / fastest - 1


def _memory_cap() -> int:
    import psutil

    return min(CALIBRATION_BYTES, int(psutil.virtual_memory().available) // 4)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardedCosts:
    """What FSDP2 adds to a rank's step besides its collectives' transfers (its copies into
    and out of the collectives' buffers, its hooks, the optimizer on DTensor shards), timed in
    this process under torch's fake process group (NOTE [ Predicting FSDP2 with a fake process
    group ] in ``memprop.distribute.fsdp``), where collectives move nothing."""

    per_microbatch_s: float
    """Beyond the microbatch's calibrated compute."""
    per_step_s: float
    """The optimizer's step on the rank's shards, and FSDP2's work once a step."""
    microbatch_s: float = 0.0
    """A microbatch's whole step under the fake group (``T(2) - T(1)``), compute included."""
    collectives_scale: float = 1.0
    """FSDP2's collectives as it runs them on real ranks over their price by the timed links
    (NOTE [ FSDP2's collectives on real ranks ]); 1 when not measured."""


def sharded_costs(factory: Callable[[int], object], micro: int, blocks: Sequence[str],
                  world: int, threads: int, compute_s: float) -> ShardedCosts | None:
    """Rank 0's step of ``micro`` samples under FSDP2 over ``blocks`` timed with one and two
    microbatches (``T(M) = M a + b``): ``a`` less ``compute_s`` (the microbatch's calibrated
    compute) is FSDP2's per microbatch, ``b`` its per step. None when it cannot run here."""
    from memprop.distribute import fsdp
    from memprop.workload import Workload

    def timed(microbatches: int) -> float:
        with fsdp.fake_group(0, world) as mesh, torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            workload = factory(micro)
            assert isinstance(workload, Workload)
            fsdp.shard(workload, blocks, mesh)
            step = fsdp.sharded_step(workload, microbatches)
            times: list[float] = []
            began = time.perf_counter()
            while len(times) < LEAST_TIMED_STEPS + 1 or (
                    len(times) < MOST_TIMED_STEPS and time.perf_counter() - began < TIMING_S):
                started = time.perf_counter()
                step()
                times.append(time.perf_counter() - started)
            return min(times[1:])

    try:
        with _threads(threads), _flushing_denormals():  # gathered buffers hold no data
            one, two = timed(1), timed(2)
    except Exception:  # a model FSDP2 cannot shard here: its transfers alone price it
        return None
    per_microbatch = max(0.0, two - one)
    return ShardedCosts(per_microbatch_s=max(0.0, per_microbatch - compute_s),
                        per_step_s=max(0.0, one - per_microbatch), microbatch_s=per_microbatch)


SHARDED_REAL_STEPS = 9
"""Steps each rank runs at each microbatch count when FSDP2 is timed on real ranks (a fixed
count: every rank must issue the same collectives); the first is left out, the fastest kept."""
SHARDED_REAL_MICROBATCHES = 3
"""Timed with one microbatch and with this many: the wider apart, the less a step's noise
weighs on the microbatch's share."""


def collectives_scale(real_microbatch_s: float, fake_microbatch_s: float, priced_s: float
                      ) -> float:
    """NOTE [ FSDP2's collectives on real ranks ]
    FSDP2 does not run its collectives as they are timed alone (``communication``: one
    collective at a time, the ranks lined up by a barrier, the main thread waiting): it issues
    them from its hooks, the all-gather of the next unit prefetched while the current one
    computes, the reduce-scatter with ``ReduceOp.AVG`` (gloo runs it as an all-reduce: the
    profiler shows ``gloo:all_reduce``, not ``gloo:reduce_scatter``), on gloo's worker thread,
    which shares the rank's core with its compute. On this 2-core machine the seed MLP of
    depth 8 width 512 spent about twice its priced time in them. So a microbatch's step is
    timed once a workload on real ranks (``real_microbatch_s``) and under the fake group, where the
    collectives move nothing: what the real ranks spend beyond the fake group's step is their
    collectives as FSDP2 runs them, and its ratio to the same collectives priced over the
    timed links scales every FSDP2 candidate's collectives (a world too large to launch here
    is priced at the ratio of the one launched)."""
    if priced_s <= 0:
        return 1.0
    return max(0.0, real_microbatch_s - fake_microbatch_s) / priced_s


def real_microbatch_s(factory: Callable[[int], object], micro: int, blocks: Sequence[str],
                      ranks: int, backend: str) -> float:
    """A microbatch's step (``(T(M) - T(1)) / (M - 1)``, each the fastest of its steps on
    rank 0, ``M`` = ``SHARDED_REAL_MICROBATCHES``) under
    FSDP2 over ``blocks`` on ``ranks`` real ranks launched here."""
    from memprop.distribute.launch import spawn

    found = spawn(_real_sharded_steps, ranks, backend, (factory, micro, tuple(blocks)))[0]
    return max(0.0, float(found["many"] - found["one"]) / (SHARDED_REAL_MICROBATCHES - 1))


def _real_sharded_steps(rank: int, world: int, factory: Callable[[int], object], micro: int,
                        blocks: tuple[str, ...]) -> dict[str, float]:
    import torch.distributed as dist

    from memprop.distribute import fsdp

    workload = _built(factory, micro)
    fsdp.shard(workload, blocks)
    fastest: dict[str, float] = {}
    for name, microbatches in (("one", 1), ("many", SHARDED_REAL_MICROBATCHES)):
        step = fsdp.sharded_step(workload, microbatches)
        times: list[float] = []
        for _ in range(SHARDED_REAL_STEPS):
            dist.barrier()
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        fastest[name] = min(times[1:])
    return fastest


@contextlib.contextmanager
def _flushing_denormals() -> Iterator[None]:
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
