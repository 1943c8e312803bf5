"""``memprop.distribute``: the candidates, each predicted per rank, and the choice."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memprop.distribute import strategies as registry
from memprop.distribute.strategies import DEFAULT_STRATEGIES, REGISTRY
from memprop.distribute.strategy import Candidate, Factory, Rank, Request, Strategy
from memprop.errors import BudgetInfeasibleError, PlanCheckError, UsageError
from memprop.units import format_bytes, parse_size

__all__ = ["DEFAULT_MICROBATCHES", "DEFAULT_STRATEGIES", "STRATEGIES", "Candidate",
           "Distribution", "Rank", "distribute"]

SCHEMA_VERSION = 1
DEFAULT_MICROBATCHES = (1, 2, 4, 8)
STRATEGIES = tuple(REGISTRY)
"""Every registered strategy's name (``memprop.distribute.strategies``)."""


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
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
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
    measures each rank's steady-state peak with the ledger and the allocator. ``strategies``
    names registered strategies (``memprop.distribute.strategies``): ``accumulate``, ``ddp``,
    ``fsdp`` (FSDP2) and ``pipeline`` (NOTE [ Replaying a pipeline schedule ] in
    ``memprop.distribute.pipeline``: models that are an ``nn.Sequential``) by default, and
    ``zero1`` (DDP with ZeroRedundancyOptimizer) when asked for. Raises
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
    asked = registry.chosen(strategies, f"strategies {list(strategies)}")
    budget_bytes = None if budget is None else parse_size(budget)
    if devices > 1:
        _check_backend(backend)
    from memprop.distribute.communication import communication

    comm = communication(backend, devices, link) if devices > 1 else None
    request = Request(factory, batch_size, devices, budget_bytes, comm, backend)
    counts = sorted(set(microbatches))
    if calibrate:
        sizes = sorted(set().union(*(s.microbatch_sizes(request, counts) for s in asked)))
        request.calibrate(sizes or [batch_size],
                          1 if all(s.single_device for s in asked) else devices)
    candidates, notes = _candidates(request, counts, asked)
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


def _contended(request: Request, candidates: list[Candidate], max_ranks: int | None
               ) -> list[Candidate]:
    """Before they run here: the candidates on several ranks priced as their ranks step at
    once on this machine (NOTE [ Ranks that share a machine ] in
    ``memprop.distribute.steptime``)."""
    from memprop.distribute import steptime
    from memprop.distribute.launch import available_cores

    if not any(c.devices > 1 for c in candidates):
        return candidates
    ranks = min(request.devices, available_cores() if max_ranks is None else max_ranks)
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


def _candidates(request: Request, counts: list[int], asked: list[Strategy]
                ) -> tuple[list[Candidate], list[str]]:
    """Every candidate of the strategies asked for, in the registry's order, and why a
    strategy has none."""
    candidates: list[Candidate] = []
    notes: list[str] = []
    for strategy in asked:
        found, said = strategy.candidates(request, counts, alone=len(asked) == 1)
        candidates += found
        notes += said
    return candidates, notes


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
