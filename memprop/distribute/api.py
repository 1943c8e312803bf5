"""``memprop.distribute``: the candidates, each predicted per rank, and the choice."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memprop.distribute import steptime
from memprop.distribute.pipeline import PipelineShape
from memprop.errors import BudgetInfeasibleError, PlanCheckError, UsageError
from memprop.plan.api import chain_of
from memprop.plan.chain import Chain
from memprop.plan.schedule import flat, simulate
from memprop.plan.solvers import Plan, min_feasible_bytes, solve
from memprop.trace.fake import new_fake_mode
from memprop.trace.ledger import rounded_bytes
from memprop.units import format_bytes, parse_size
from memprop.workload import Workload

__all__ = ["DEFAULT_MICROBATCHES", "STRATEGIES", "Candidate", "Distribution", "Rank",
           "distribute"]

SCHEMA_VERSION = 1
DEFAULT_MICROBATCHES = (1, 2, 4, 8)
STRATEGIES = ("accumulate", "ddp", "fsdp", "pipeline")
Factory = Callable[[int], Workload]
"""Builds a rank's workload for a batch size (each rank builds its own)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Rank:
    rank: int
    predicted_peak_bytes: int
    measured_peak_bytes: int | None = None
    """The ledger's count of the rank's steady-state step, with ``run=True``."""
    allocator_peak_bytes: int | None = None
    """The allocator's count of the same step (``memprop.devices.allocator``): the independent
    figure predictions are checked against."""

    @property
    def independent_peak_bytes(self) -> int | None:
        """What a prediction is checked against: the allocator's figure where there is one,
        else the ledger's."""
        return (self.allocator_peak_bytes if self.allocator_peak_bytes is not None
                else self.measured_peak_bytes)


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """One way to run the step, predicted per rank."""

    strategy: str
    """``accumulate`` (one device), ``ddp``, ``fsdp`` (FSDP2) or ``pipeline``."""
    devices: int
    microbatches: int
    microbatch_size: int
    """Samples per microbatch on each rank."""
    fits: bool
    """Every rank's predicted peak is within the budget."""
    predicted_step_s: float
    """Compute of the step at the roofline's rates (recomputation included), plus the
    gradients' all-reduce for DDP."""
    ranks: tuple[Rank, ...]
    least_budget_bytes: int
    """The least per-rank budget this candidate meets, recomputing as much as it can."""
    plan: Plan | None = None
    """memprop's recomputation plan for each rank's microbatch step, when it needs one."""
    measured_step_s: float | None = None
    why: str = ""
    """Why it was not chosen (empty for the chosen one)."""
    pipeline: PipelineShape | None = None
    """The schedule and split points of a pipeline candidate."""
    sharded: tuple[str, ...] = ()
    """FSDP2's units besides the root: the blocks' qualified names."""

    @property
    def peak_bytes(self) -> int:
        return max(r.predicted_peak_bytes for r in self.ranks)

    def describe(self) -> str:
        """``DDP 2 ranks, 4x256 +8% recompute``: where, microbatches x their size, and the
        recomputation plan's extra compute."""
        if self.pipeline is not None:
            cuts = "|".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}"
                            for a, b in itertools.pairwise(self.pipeline.bounds))
            again = (f", recomputing stage{'s' if len(self.pipeline.recomputed) > 1 else ''} "
                     + ",".join(map(str, self.pipeline.recomputed))
                     if self.pipeline.recomputed else "")
            return (f"{self.pipeline.schedule} {self.devices} ranks, "
                    f"{self.microbatches}x{self.microbatch_size}, blocks {cuts}{again}")
        way = ("1 device" if self.devices == 1 else
               f"{'FSDP2' if self.strategy == 'fsdp' else 'DDP'} {self.devices} ranks")
        parts = f"{way}, {self.microbatches}x{self.microbatch_size}"
        if self.plan is not None:
            parts += f" +{self.plan.compute_overhead:.0%} recompute"
        return parts

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "schedule": None if self.pipeline is None else self.pipeline.schedule,
            "microbatches": self.microbatches,
            "microbatch_size": self.microbatch_size,
            "split": None if self.pipeline is None else list(self.pipeline.bounds),
            "recomputed_stages": None if self.pipeline is None else list(
                self.pipeline.recomputed),
            "devices": self.devices,
            "fits": self.fits,
            "predicted_step_s": self.predicted_step_s,
            "measured_step_s": self.measured_step_s,
            "least_budget_bytes": self.least_budget_bytes,
            "recompute_overhead": None if self.plan is None else self.plan.compute_overhead,
            "why_not": self.why or None,
            "ranks": [{"rank": r.rank, "predicted_peak_bytes": r.predicted_peak_bytes,
                       "measured_peak_bytes": r.measured_peak_bytes,
                       "allocator_peak_bytes": r.allocator_peak_bytes} for r in self.ranks],
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Distribution:
    devices: int
    budget_bytes: int | None
    batch_size: int
    candidates: tuple[Candidate, ...]
    chosen: int
    """Index of the chosen candidate: the fastest predicted step that fits."""
    communication: str
    """How the all-reduce and the send were priced."""
    notes: tuple[str, ...] = ()
    """Why a strategy has no candidates (a model that cannot be pipelined, say)."""
    step_time: str = ""
    """How the steps were priced (NOTE [ Calibrating the roofline on the workload ])."""
    step_error: float = 0.0
    """The step-time model's error measured on this workload (relative)."""

    def check(self) -> tuple[PlanCheckError | None, list[str]]:
        """After ``run=True``: an error when the chosen candidate's measured peak on a rank
        exceeded the budget (its prediction fitted: memprop's model was wrong), and a warning
        for every rank of every candidate measured more than ``PREDICTION_TOLERANCE`` away
        from its prediction, or over the budget it was predicted to fit. Measured is the
        allocator's count (``Rank.independent_peak_bytes``), which shares nothing with the
        ledger that predicts."""
        from memprop.run.measure import mismatch

        error, warnings = None, []
        for index, candidate in enumerate(self.candidates):
            for rank in candidate.ranks:
                measured = rank.independent_peak_bytes
                if measured is None:
                    continue
                where = f"of rank {rank.rank} under {candidate.describe()}"
                if stray := mismatch(rank.predicted_peak_bytes, measured, f"measured {where}"):
                    warnings.append(stray)
                over = (candidate.fits and self.budget_bytes is not None
                        and measured > self.budget_bytes)
                if over and index == self.chosen and error is None:
                    assert self.budget_bytes is not None
                    error = PlanCheckError(
                        f"the chosen candidate ({candidate.describe()}) measured "
                        f"{format_bytes(measured)} on rank {rank.rank}, over the budget of "
                        f"{format_bytes(self.budget_bytes)} it was predicted to fit "
                        f"({format_bytes(rank.predicted_peak_bytes)}): a memprop bug, please "
                        "report it with the JSON document")
                elif over:
                    warnings.append(f"{candidate.describe()} measured {format_bytes(measured)} "
                                    f"on rank {rank.rank}, over the budget it was predicted "
                                    "to fit")
        return error, warnings

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "devices": self.devices,
            "budget_bytes": self.budget_bytes,
            "batch_size": self.batch_size,
            "communication": self.communication,
            "step_time": {"model": self.step_time, "error": self.step_error},
            "candidates": [c.to_dict() for c in self.candidates],
            "chosen": self.chosen,
            "notes": list(self.notes),
        }


def distribute(
    factory: Factory,
    *,
    batch_size: int,
    devices: int,
    budget: int | str | None = None,
    microbatches: Sequence[int] = DEFAULT_MICROBATCHES,
    run: bool = False,
    steps: int = 3,
    backend: str = "gloo",
    strategies: Sequence[str] = STRATEGIES,
    link: tuple[float, float] | None = None,
    max_ranks: int | None = None,
    calibrate: bool = True,
) -> Distribution:
    """Candidates for a training step of ``batch_size`` samples on up to ``devices`` ranks,
    each predicted per rank (NOTE [ What each rank holds ] in ``memprop.distribute``), and the
    fastest that fits ``budget`` (bytes or a size, per rank; None: anything fits).

    ``factory(batch_size)`` builds a rank's ``Workload`` (model, inputs, loss, optimizer); it
    must be picklable (a module-level function) for ``run=True``, which launches the ranks
    with ``torch.distributed`` (``backend``), runs every candidate for ``steps`` steps and
    measures each rank's steady-state peak with the ledger. ``strategies`` keeps some of
    ``accumulate``, ``ddp``, ``fsdp`` (FSDP2) and ``pipeline`` (NOTE [ Replaying a pipeline
    schedule ] in ``memprop.distribute.pipeline``: models that are an ``nn.Sequential``). Raises
    :class:`memprop.BudgetInfeasibleError` (with the least per-rank budget) when nothing fits.

    Communication is priced by each collective's algorithm over ``link`` (bytes per second,
    seconds a message) or over links timed on this machine across at most its cores (NOTE
    [ Pricing collectives by their algorithm ]): a world of any size is predicted without
    being launched. ``run=True`` launches at most ``max_ranks`` ranks (default: this machine's
    cores, one rank each); candidates on more are predicted only, and a note says so. More
    ranks than cores may be asked for explicitly: their memory is measured as well, their
    times are not comparable (the ranks share cores), and a note says that too.

    Step times are the roofline's, calibrated (``calibrate``) by real steps of the workload
    timed once here (NOTE [ Calibrating the roofline on the workload ] in
    ``memprop.distribute.steptime``).
    """
    if devices < 1:
        raise UsageError(f"devices is {devices}: give at least 1")
    if batch_size < 1:
        raise UsageError(f"batch_size is {batch_size}: give at least 1")
    if not microbatches or any(m < 1 for m in microbatches):
        raise UsageError(f"microbatches {list(microbatches)}: give counts of at least 1")
    if steps < 1:
        raise UsageError(f"steps is {steps}: give at least 1")
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        raise UsageError(f"strategies {list(strategies)}: choose among {', '.join(STRATEGIES)}")
    budget_bytes = None if budget is None else parse_size(budget)
    if devices > 1:
        _check_backend(backend)
    from memprop.distribute.communication import communication

    comm = communication(backend, devices, link) if devices > 1 else None
    request = _Request(factory, batch_size, devices, budget_bytes, comm, backend)
    counts = sorted(set(microbatches))
    if calibrate:
        request.calibrate(_microbatch_sizes(batch_size, devices, counts, strategies),
                          1 if set(strategies) == {"accumulate"} else devices)
    candidates, notes = _candidates(request, counts, strategies)
    if not candidates:
        raise UsageError(f"batch {batch_size} splits into none of the microbatch counts "
                         f"{sorted(set(microbatches))} on 1 or {devices} devices: give a batch "
                         "divisible by devices x microbatches")
    if run:
        candidates = _contended(request, candidates, max_ranks)
        candidates, said = _measured(factory, candidates, steps=steps, backend=backend,
                                     max_ranks=max_ranks)
        notes += said
    fitting = [i for i, c in enumerate(candidates) if c.fits]
    if not fitting:
        least = min(c.least_budget_bytes for c in candidates)
        assert budget_bytes is not None
        raise BudgetInfeasibleError(
            f"no candidate fits {format_bytes(budget_bytes)} per rank: the least per-rank "
            f"budget any of them meets is {format_bytes(least)} ({least} bytes); raise the "
            "budget or use more devices", budget_bytes=budget_bytes, min_feasible_bytes=least)
    # Of equally fast candidates (GPipe and 1F1B often simulate alike), the one that holds
    # least, then the one on fewer devices.
    chosen = min(fitting, key=lambda i: (
        candidates[i].predicted_step_s, candidates[i].peak_bytes,
        sum(r.predicted_peak_bytes for r in candidates[i].ranks), candidates[i].devices))
    best = candidates[chosen]
    candidates = [c if i == chosen else _why_not(c, best, budget_bytes)
                  for i, c in enumerate(candidates)]
    if close := _within_error(candidates, chosen, request.calibration.error):
        notes.append(close)
    return Distribution(
        devices=devices, budget_bytes=budget_bytes, batch_size=batch_size,
        candidates=tuple(candidates), chosen=chosen,
        communication="none (one device)" if comm is None else comm.describe(),
        notes=tuple(notes), step_time=request.calibration.describe(),
        step_error=request.calibration.error,
    )


def _microbatch_sizes(batch_size: int, devices: int, counts: list[int],
                      strategies: Sequence[str]) -> list[int]:
    """The microbatch sizes the candidates will use."""
    worlds = [1] if "accumulate" in strategies else []
    if devices > 1 and {"ddp", "fsdp"} & set(strategies):
        worlds.append(devices)
    sizes = {batch_size // (n * m) for n in worlds for m in counts if batch_size % (n * m) == 0}
    if devices > 1 and "pipeline" in strategies:
        sizes |= {batch_size // m for m in counts if batch_size % m == 0 and m >= devices}
    return sorted(sizes) or [batch_size]


def _within_error(candidates: list[Candidate], chosen: int, error: float) -> str:
    """A note when the runner-up's predicted step is within the model's error of the
    chosen one's."""
    best = candidates[chosen]
    others = [c for i, c in enumerate(candidates) if i != chosen and c.fits]
    if not others or error <= 0:
        return ""
    runner = min(others, key=lambda c: c.predicted_step_s)
    margin = runner.predicted_step_s / best.predicted_step_s - 1
    if margin > error:
        return ""
    return (f"the choice is {margin:.0%} faster than {runner.describe()} as predicted, within "
            f"the step-time model's error ({error:.0%}): either may be the faster")


def _contended(request: _Request, candidates: list[Candidate], max_ranks: int | None
               ) -> list[Candidate]:
    """Before they run here: the candidates on several ranks priced as their ranks step at
    once on this machine (NOTE [ Ranks that share a machine ] in
    ``memprop.distribute.steptime``)."""
    from memprop.distribute.launch import available_cores

    ranks = min(request.devices, available_cores() if max_ranks is None else max_ranks)
    if not any(c.devices > 1 for c in candidates):
        return candidates
    request.calibration = steptime.timed_together(request.calibration, request.factory, ranks,
                                                  request.backend)
    return [dataclasses.replace(c, predicted_step_s=request.calibration.on_ranks(
        c.predicted_step_s, c.devices)) for c in candidates]


def _measured(factory: Factory, candidates: list[Candidate], *, steps: int, backend: str,
              max_ranks: int | None) -> tuple[list[Candidate], list[str]]:
    """The candidates on at most ``max_ranks`` ranks (default: the cores) run and measured in
    one launch; the others as predicted. What was not run, or not comparably timed, noted."""
    from memprop.distribute.launch import available_cores, measure

    cores = available_cores()
    limit = cores if max_ranks is None else max_ranks
    if limit < 1:
        raise UsageError(f"max_ranks is {limit}: give at least 1")
    runnable = [i for i, c in enumerate(candidates) if c.devices <= limit]
    notes = []
    if len(runnable) < len(candidates):
        left = sorted({c.devices for c in candidates if c.devices > limit})
        notes.append(f"candidates on {', '.join(map(str, left))} ranks predicted only, not run: "
                     f"a launch on this machine takes at most {limit} ranks (one per core, "
                     f"{cores} cores)")
    if not runnable:
        return candidates, notes
    launched = measure(factory, [candidates[i] for i in runnable], steps=steps,
                       backend=backend)
    world = max(c.devices for c in launched)
    if world > cores:
        notes.append(f"measured step times are not comparable with each other: {world} ranks "
                     f"shared {cores} cores")
    merged = list(candidates)
    for index, candidate in zip(runnable, launched, strict=True):
        merged[index] = candidate
    return merged, notes


@dataclass(slots=True)
class _Request:
    """What every candidate is built from, and the microbatch chains they share (traced once
    per microbatch size and gradient zeroing, whichever strategy asks)."""

    factory: Factory
    batch_size: int
    devices: int
    budget_bytes: int | None
    comm: Any
    backend: str
    calibration: steptime.Calibration = steptime.UNCALIBRATED
    sharded: steptime.ShardedCosts | None = None
    """FSDP2's own costs, timed once (``steptime.sharded_costs``) when calibrated."""
    _chains: dict[tuple[int, bool], tuple[Workload, Chain]] = field(default_factory=dict)

    def calibrate(self, sizes: list[int], world: int) -> None:
        """Time the workload once (NOTE [ Calibrating the roofline on the workload ])."""
        from memprop.distribute.launch import available_cores

        cores = available_cores()
        self.calibration = steptime.calibrate(
            self.factory, sizes, lambda m: self.unplanned(m).compute,
            lambda m: self.unplanned(m).peak_bytes, max(1, cores // min(world, cores)))

    def unplanned(self, micro: int) -> Any:
        """The unplanned microbatch step, simulated."""
        return simulate(self.chain(micro)[1], flat(len(self.chain(micro)[1])))

    def time_sharded(self, micro: int) -> None:
        """FSDP2's own costs on a microbatch of ``micro``, timed when the workload was
        calibrated and the microbatch is small enough to run here."""
        from memprop.distribute.launch import available_cores

        unplanned = self.unplanned(micro)
        if (not self.calibration.sizes or unplanned.compute > steptime.CALIBRATION_S
                or unplanned.peak_bytes > steptime.CALIBRATION_BYTES):
            return
        blocks = tuple(s.name for s in self.chain(micro)[1].stages if not s.pinned)
        cores = available_cores()
        self.sharded = steptime.sharded_costs(
            self.factory, micro, blocks, self.devices, max(1, cores // min(self.devices, cores)),
            self.factor(micro) * unplanned.compute)

    def factor(self, micro: int) -> float:
        """What the roofline's prices of a microbatch of ``micro`` are multiplied by."""
        return self.calibration.factor(self.unplanned(micro).compute)

    def pipeline_action_s(self, schedule: str = "GPipe") -> float:
        """What the pipeline runtime adds to each action of a stage under ``schedule`` (timed
        once a machine), when the steps are calibrated."""
        if not self.calibration.sizes:
            return 0.0
        from memprop.distribute.communication import pipeline_action_s

        return pipeline_action_s(self.backend, schedule)

    def microbatches_s(self, micro: int, microbatches: int, compute: float) -> float:
        """``microbatches`` microbatches of ``micro`` samples, each priced ``compute`` by the
        roofline (with gradients accumulating from the second on, and a plan's recomputation),
        and the optimizer's step. Calibrated, the accumulating adds are priced as the bytes
        they move (each gradient read twice and written once), at the calibrated copy rate,
        not by the roofline's pointwise timings of in-place adds (which a loaded machine can
        leave far off)."""
        if microbatches > 1 and self.calibration.sizes:
            workload, chain = self.chain(micro, set_to_none=False)
            accumulating = simulate(chain, flat(len(chain))).compute
            compute -= max(0.0, accumulating - self.unplanned(micro).compute)
            adds = self.calibration.scale * 3 * _bucket_bytes(workload) / _copy_rate()
            return (microbatches * self.factor(micro) * compute + self.optimizer_s()
                    + (microbatches - 1) * adds)
        return microbatches * self.factor(micro) * compute + self.optimizer_s()

    def optimizer_s(self, share: float = 1.0) -> float:
        """The optimizer's step over ``share`` of the parameters."""
        return self.calibration.optimizer_s * share

    def fits(self, peak: int) -> bool:
        return self.budget_bytes is None or peak <= self.budget_bytes

    def chain(self, micro: int, *, set_to_none: bool = True) -> tuple[Workload, Chain]:
        """A fake workload of ``micro`` samples and the chain of its steady-state step."""
        key = (micro, set_to_none)
        if key not in self._chains:
            with new_fake_mode():
                workload = self.factory(micro)
            workload.set_to_none = set_to_none
            self._chains[key] = (workload, chain_of(workload, cost_model="roofline",
                                                    fake=True))
        return self._chains[key]


def _candidates(request: _Request, counts: list[int], strategies: Sequence[str]
                ) -> tuple[list[Candidate], list[str]]:
    """Every candidate of the strategies asked for, and why a strategy has none."""
    devices = request.devices
    shapes = [(1, m) for m in counts] if "accumulate" in strategies else []
    if devices > 1 and "ddp" in strategies:
        shapes += [(devices, m) for m in counts]
    candidates = [c for n, m in shapes if (c := _candidate(request, n, m)) is not None]
    notes: list[str] = []
    only = list(strategies)
    if devices > 1 and "fsdp" in strategies:
        from memprop.distribute import fsdp

        if why := fsdp.why_not():
            notes.append(f"no FSDP2 candidates: {why}")
        else:
            splits = [m for m in counts if request.batch_size % (devices * m) == 0]
            if splits:  # timed on the smallest microbatch
                request.time_sharded(request.batch_size // (devices * max(splits)))
            candidates += [c for m in counts if (c := _fsdp_candidate(request, m)) is not None]
    if "pipeline" in strategies and devices < 2 and only == ["pipeline"]:
        raise UsageError("a pipeline needs at least 2 devices")
    if "pipeline" in strategies and devices > 1:
        found, why = _pipeline_candidates(request, counts)
        if why and not found and only == ["pipeline"]:
            raise UsageError(f"no pipeline: {why}")
        if why:
            notes.append(f"no pipeline {'of some schedules' if found else 'candidates'}: {why}")
        candidates += found
    return candidates, notes


def _candidate(request: _Request, devices: int, microbatches: int) -> Candidate | None:
    if request.batch_size % (devices * microbatches):
        return None
    micro = request.batch_size // (devices * microbatches)
    # From the second microbatch on, the gradients accumulate in place: live through the
    # step, as a loop that zeroes them with set_to_none=False holds them.
    workload, chain = request.chain(micro, set_to_none=microbatches == 1)
    extra = _bucket_bytes(workload) if devices > 1 else 0
    unplanned = simulate(chain, flat(len(chain)))
    least = min_feasible_bytes(chain)[0] + extra
    plan = None
    peak, compute = unplanned.peak_bytes + extra, unplanned.compute
    budget = request.budget_bytes
    if budget is not None and peak > budget and least <= budget:
        plan = solve(chain, budget - extra, "optimal")
        peak, compute = plan.peak_bytes + extra, plan.compute
    allreduce = request.comm.allreduce_s(extra) + _bucket_copies_s(extra) if devices > 1 else 0.0
    return Candidate(
        strategy="accumulate" if devices == 1 else "ddp", devices=devices,
        microbatches=microbatches, microbatch_size=micro, fits=request.fits(peak),
        predicted_step_s=request.microbatches_s(micro, microbatches, compute) + allreduce,
        ranks=tuple(Rank(rank=r, predicted_peak_bytes=peak) for r in range(devices)),
        least_budget_bytes=least, plan=plan)


def _fsdp_candidate(request: _Request, microbatches: int) -> Candidate | None:
    """FSDP2 over every block (NOTE [ Predicting FSDP2 with a fake process group ]); its step:
    the microbatches' compute, plus for each unit and microbatch an all-gather in the forward,
    another in the backward and a reduce-scatter of its gradients (NOTE [ Pricing collectives
    by their algorithm ]), not overlapped, and FSDP2's own work (``steptime.sharded_costs``).
    One rank of each kind is traced (``_alike_ranks``)."""
    from memprop.distribute import fsdp

    devices = request.devices
    if request.batch_size % (devices * microbatches):
        return None
    micro = request.batch_size // (devices * microbatches)
    workload, chain = request.chain(micro)
    blocks = tuple(s.name for s in chain.stages if not s.pinned)
    kinds = _alike_ranks(workload.model, devices)
    traced = {kind: fsdp.rank_peak_bytes(request.factory, micro, microbatches, devices,
                                         kinds[kind][0], blocks, request.backend)
              for kind in kinds}
    peaks = [0] * devices
    for kind, ranks in kinds.items():
        for rank in ranks:
            peaks[rank] = traced[kind]
    comm = request.comm
    gathers = sum(2 * comm.allgather_s(size) + comm.reduce_scatter_s(size)
                  for size in fsdp.unit_bytes(workload.model, blocks))
    compute = simulate(chain, flat(len(chain))).compute
    own = request.sharded
    per_microbatch = 0.0 if own is None else own.per_microbatch_s
    per_step = request.optimizer_s(1 / devices) if own is None else own.per_step_s
    return Candidate(
        strategy="fsdp", devices=devices, microbatches=microbatches, microbatch_size=micro,
        fits=request.fits(max(peaks)),
        predicted_step_s=(microbatches * (request.factor(micro) * compute + per_microbatch
                                          + gathers) + per_step),
        ranks=tuple(Rank(rank=r, predicted_peak_bytes=p) for r, p in enumerate(peaks)),
        least_budget_bytes=max(peaks), sharded=blocks)


def _alike_ranks(model: torch.nn.Module, devices: int) -> dict[tuple[int, ...], list[int]]:
    """The ranks of an FSDP2 world grouped by the rows of every parameter they hold: FSDP2
    shards each parameter's first dimension as ``torch.chunk`` does (``ceil(rows / N)`` rows
    a rank, the last ranks fewer or none), and ranks holding the same rows of everything run
    the same step on tensors of the same sizes. Of 4096 ranks a handful are traced."""
    sizes = [p.shape[0] if p.dim() else 1 for p in model.parameters()]
    kinds: dict[tuple[int, ...], list[int]] = {}
    for rank in range(devices):
        held = []
        for rows in sizes:
            chunk = -(-rows // devices)
            held.append(max(0, min(chunk, rows - rank * chunk)))
        kinds.setdefault(tuple(held), []).append(rank)
    return kinds


def _pipeline_candidates(request: _Request, counts: list[int]) -> tuple[list[Candidate], str]:
    """One candidate per schedule and microbatch count. Empty, with the reason, when the
    model cannot be cut."""
    from memprop.distribute import pipeline as pp

    devices, batch_size = request.devices, request.batch_size
    with new_fake_mode():  # one fake workload replayed for every shape and rank
        whole = request.factory(batch_size)
        items = pp.sequential_items(whole)
        if isinstance(items, str):
            return [], items
        names = {id(m): name for name, m in whole.model.named_modules()}
        item_names = [names[id(item)] for item in items]
        found: list[Candidate] = []
        skipped = []
        for schedule, per_rank in pp.SCHEDULES.items():
            stages = devices * per_rank
            if stages > len(items):
                skipped.append(f"{schedule} needs {stages} blocks, the model has {len(items)}")
                continue
            for m_count in counts:
                if batch_size % m_count or m_count < devices or (per_rank > 1
                                                                 and m_count % devices):
                    # Fewer microbatches than ranks leave ranks idle (and Schedule1F1B
                    # refuses them); the looped schedules take them in rounds of the ranks.
                    continue
                found.append(_pipeline_candidate(request, whole, items, item_names, schedule,
                                                 m_count))
    if skipped:
        return found, f"{'; '.join(skipped)} (a stage per block at least)"
    if not found:
        return found, (f"{devices} ranks need {devices} microbatches or more (a multiple of "
                       f"{devices} for the looped schedules) that divide the batch of "
                       f"{batch_size}: give --microbatches {devices},{2 * devices}")
    return found, ""


def _pipeline_candidate(request: _Request, whole: Workload, items: list[Any],
                        item_names: list[str], schedule: str, m_count: int) -> Candidate:
    """The splits tried in order of their predicted step, replayed until one fits: the
    fastest that fits; when none does, the one with the least peak, its over-budget ranks
    recomputing (``_recompute_stages``)."""
    from memprop.distribute import pipeline as pp

    devices = request.devices
    micro = request.batch_size // m_count
    forward, backward, boundary = _item_costs(request, micro, item_names)
    factor = request.factor(micro)
    forward, backward = [f * factor for f in forward], [b * factor for b in backward]
    action = request.pipeline_action_s(schedule)

    def seconds(shape: PipelineShape) -> float:
        """The simulated step; a recomputed stage runs its forward again in its backward."""
        stage_f = [f + action for f in _per_stage(forward, shape.bounds)]
        stage_b = [b + action + (f if s in shape.recomputed else 0.0) for s, (f, b) in
                   enumerate(zip(stage_f, _per_stage(backward, shape.bounds), strict=True))]
        return pp.simulated_seconds(shape, stage_f, stage_b, request.comm.send.seconds,
                                    [boundary[b] for b in shape.bounds])

    shapes = sorted((pp.PipelineShape(schedule=schedule, ranks=devices, microbatches=m_count,
                                      bounds=bounds)
                     for bounds in pp.splits_tried(len(items), devices * pp.SCHEDULES[schedule],
                                                   [f + b for f, b in zip(forward, backward,
                                                                          strict=True)])),
                    key=seconds)
    replayed: list[tuple[list[int], PipelineShape]] = []
    for shape in shapes:
        replayed.append(([pp.rank_peak_bytes(whole, items, shape, r) for r in range(devices)],
                         shape))
        if request.fits(max(replayed[-1][0])):
            break
    peaks, shape = replayed[-1]
    if not request.fits(max(peaks)):
        peaks, shape = min(replayed, key=lambda r: max(r[0]))
        assert request.budget_bytes is not None
        shape, peaks = _recompute_stages(whole, items, shape, peaks, request.budget_bytes)
    return Candidate(
        strategy="pipeline", devices=devices, microbatches=m_count, microbatch_size=micro,
        pipeline=shape, fits=request.fits(max(peaks)),
        predicted_step_s=seconds(shape) + request.optimizer_s(_largest_share(items, shape)),
        ranks=tuple(Rank(rank=r, predicted_peak_bytes=p) for r, p in enumerate(peaks)),
        least_budget_bytes=max(peaks))


def _largest_share(items: list[Any], shape: PipelineShape) -> float:
    """The largest share of the parameters one rank holds: its optimizer's step ends the
    pipeline's step (the ranks step their own stages' parameters at once)."""
    from memprop.distribute import pipeline as pp

    sizes = [sum(p.numel() for item in items[a:b] for p in item.parameters())
             for a, b in itertools.pairwise(shape.bounds)]
    total = sum(sizes)
    if not total:
        return 0.0
    held = pp.placement(shape.schedule, shape.ranks)
    return float(max(sum(sizes[s] for s in stages) for stages in held.values()) / total)


def _recompute_stages(whole: Workload, items: list[Any], shape: PipelineShape,
                      peaks: list[int], budget_bytes: int) -> tuple[PipelineShape, list[int]]:
    """Checkpoint whole stages of the ranks over the budget, one at a time (on a rank with two,
    the one whose checkpoint frees more first), each replayed, until every rank fits or every
    stage of those ranks is checkpointed."""
    from memprop.distribute import pipeline as pp

    held = pp.placement(shape.schedule, shape.ranks)
    peaks = list(peaks)
    while True:
        over = [r for r, p in enumerate(peaks) if p > budget_bytes]
        if not over:
            return shape, peaks
        rank = over[0]
        left = [s for s in held[rank] if s not in shape.recomputed]
        if not left:
            return shape, peaks
        trials = []
        for stage in left:
            trial = dataclasses.replace(shape, recomputed=tuple(sorted(
                (*shape.recomputed, stage))))
            trials.append((pp.rank_peak_bytes(whole, items, trial, rank), trial))
        peaks[rank], shape = min(trials, key=lambda t: t[0])


def _item_costs(request: _Request, micro: int, item_names: list[str]
                ) -> tuple[list[float], list[float], list[int]]:
    """Each item's forward and backward seconds on a microbatch (the roofline's), and the
    bytes crossing each cut (index ``i``: item ``i``'s input; the last: the output).

    The chain's stages are the model's blocks: each is summed into the item it belongs to by
    name (an item, or a module inside one); the pinned prefix goes to the first item, the
    suffix to the last. A cut after an item without blocks carries what the previous one did."""
    from memprop.trace.stages import PREFIX, SUFFIX

    _, chain = request.chain(micro)
    forward, backward = [0.0] * len(item_names), [0.0] * len(item_names)
    outputs: list[int | None] = [None] * len(item_names)
    for stage in chain.stages:
        if stage.name == PREFIX:
            index = 0
        elif stage.name == SUFFIX:
            index = len(item_names) - 1
        else:
            index = next((i for i, name in enumerate(item_names)
                          if stage.name == name or stage.name.startswith(name + ".")), -1)
        if index < 0:  # blocks that are not the items: the step spread evenly over them
            total_f = sum(s.forward_cost for s in chain.stages) / len(item_names)
            total_b = sum(s.backward_cost for s in chain.stages) / len(item_names)
            size = max(s.output_bytes for s in chain.stages)
            return ([total_f] * len(item_names), [total_b] * len(item_names),
                    [size] * (len(item_names) + 1))
        forward[index] += stage.forward_cost
        backward[index] += stage.backward_cost
        if stage.name not in (PREFIX, SUFFIX):
            outputs[index] = stage.output_bytes
    first = next(s for s in chain.stages if s.name != PREFIX)
    boundary = [first.input_bytes]
    for output in outputs:
        boundary.append(boundary[-1] if output is None else output)
    return forward, backward, boundary


def _per_stage(costs: list[float], bounds: tuple[int, ...]) -> list[float]:
    return [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]


def _bucket_bytes(workload: Workload) -> int:
    """DDP's gradient buckets: a copy of every gradient (``gradient_as_bucket_view=False``)."""
    return sum(rounded_bytes(p.numel() * p.element_size(), p.device)
               for p in workload.model.parameters() if p.requires_grad)


def _bucket_copies_s(nbytes: int) -> float:
    """DDP copies every gradient into its bucket and the reduced bucket back: two copies,
    each reading and writing ``nbytes``, at this machine's copy rate."""
    return 4 * nbytes / _copy_rate()


def _copy_rate() -> float:
    from memprop.calibration.rates import machine_rates

    return machine_rates("cpu").bytes_per_s


def _why_not(c: Candidate, best: Candidate, budget_bytes: int | None) -> Candidate:
    if not c.fits:
        assert budget_bytes is not None
        why = (f"does not fit: {format_bytes(c.peak_bytes)} per rank against "
               f"{format_bytes(budget_bytes)} (it needs at least "
               f"{format_bytes(c.least_budget_bytes)})")
    else:
        why = (f"slower: {c.predicted_step_s * 1e3:.1f} ms predicted against "
               f"{best.predicted_step_s * 1e3:.1f} ms")
    return dataclasses.replace(c, why=why)


def _check_backend(backend: str) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("torch.distributed is not available in this build of torch")
    if backend not in ("gloo", "nccl", "mpi", "ucc") or not dist.is_backend_available(backend):
        raise UsageError(f"backend {backend!r} is not available here: use gloo (CPU)"
                         + (", or nccl on a machine with NVIDIA GPUs"
                            if torch.cuda.is_available() else ""))
