"""``memprop.distribute``: the candidates, each predicted per rank, and the choice."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memprop.errors import BudgetInfeasibleError, UsageError
from memprop.plan.api import chain_of
from memprop.plan.schedule import flat, simulate
from memprop.plan.solvers import Plan, min_feasible_bytes, solve
from memprop.trace.fake import new_fake_mode
from memprop.trace.ledger import rounded_bytes
from memprop.units import format_bytes, parse_size
from memprop.workload import Workload

__all__ = ["DEFAULT_MICROBATCHES", "Candidate", "Distribution", "Rank", "distribute"]

SCHEMA_VERSION = 1
DEFAULT_MICROBATCHES = (1, 2, 4, 8)
Factory = Callable[[int], Workload]
"""Builds a rank's workload for a batch size (each rank builds its own)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Rank:
    rank: int
    predicted_peak_bytes: int
    measured_peak_bytes: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """One way to run the step, predicted per rank."""

    strategy: str
    """``accumulate`` (one device) or ``ddp``."""
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

    @property
    def peak_bytes(self) -> int:
        return max(r.predicted_peak_bytes for r in self.ranks)

    def describe(self) -> str:
        """``DDP 2 ranks, 4x256 +8% recompute``: where, microbatches x their size, and the
        recomputation plan's extra compute."""
        way = "1 device" if self.devices == 1 else f"DDP {self.devices} ranks"
        parts = f"{way}, {self.microbatches}x{self.microbatch_size}"
        if self.plan is not None:
            parts += f" +{self.plan.compute_overhead:.0%} recompute"
        return parts

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "schedule": None,
            "microbatches": self.microbatches,
            "microbatch_size": self.microbatch_size,
            "split": None,
            "devices": self.devices,
            "fits": self.fits,
            "predicted_step_s": self.predicted_step_s,
            "measured_step_s": self.measured_step_s,
            "least_budget_bytes": self.least_budget_bytes,
            "recompute_overhead": None if self.plan is None else self.plan.compute_overhead,
            "why_not": self.why or None,
            "ranks": [{"rank": r.rank, "predicted_peak_bytes": r.predicted_peak_bytes,
                       "measured_peak_bytes": r.measured_peak_bytes} for r in self.ranks],
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
    """How the all-reduce was priced."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "devices": self.devices,
            "budget_bytes": self.budget_bytes,
            "batch_size": self.batch_size,
            "communication": self.communication,
            "candidates": [c.to_dict() for c in self.candidates],
            "chosen": self.chosen,
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
) -> Distribution:
    """Candidates for a training step of ``batch_size`` samples on up to ``devices`` ranks,
    each predicted per rank (NOTE [ What each rank holds ] in ``memprop.distribute``), and the
    fastest that fits ``budget`` (bytes or a size, per rank; None: anything fits).

    ``factory(batch_size)`` builds a rank's ``Workload`` (model, inputs, loss, optimizer); it
    must be picklable (a module-level function) for ``run=True``, which launches the ranks
    with ``torch.distributed`` (``backend``), runs every candidate for ``steps`` steps and
    measures each rank's steady-state peak with the ledger. Raises
    :class:`memprop.BudgetInfeasibleError` (with the least per-rank budget) when nothing fits.
    """
    if devices < 1:
        raise UsageError(f"devices is {devices}: give at least 1")
    if batch_size < 1:
        raise UsageError(f"batch_size is {batch_size}: give at least 1")
    if not microbatches or any(m < 1 for m in microbatches):
        raise UsageError(f"microbatches {list(microbatches)}: give counts of at least 1")
    if steps < 1:
        raise UsageError(f"steps is {steps}: give at least 1")
    budget_bytes = None if budget is None else parse_size(budget)
    if devices > 1:
        _check_backend(backend)
    from memprop.distribute.communication import allreduce_model

    comm = allreduce_model(backend, devices) if devices > 1 else None
    shapes = [(1, m) for m in sorted(set(microbatches))]
    if devices > 1:
        shapes += [(devices, m) for m in sorted(set(microbatches))]
    candidates = [c for n, m in shapes
                  if (c := _candidate(factory, batch_size, n, m, budget_bytes, comm)) is not None]
    if not candidates:
        raise UsageError(f"batch {batch_size} splits into none of the microbatch counts "
                         f"{sorted(set(microbatches))} on 1 or {devices} devices: give a batch "
                         "divisible by devices x microbatches")
    if run:
        from memprop.distribute.launch import measure

        candidates = measure(factory, candidates, devices=devices, steps=steps,
                             backend=backend)
    fitting = [i for i, c in enumerate(candidates) if c.fits]
    if not fitting:
        least = min(c.least_budget_bytes for c in candidates)
        assert budget_bytes is not None
        raise BudgetInfeasibleError(
            f"no candidate fits {format_bytes(budget_bytes)} per rank: the least per-rank "
            f"budget any of them meets is {format_bytes(least)} ({least} bytes); raise the "
            "budget or use more devices", budget_bytes=budget_bytes, min_feasible_bytes=least)
    chosen = min(fitting, key=lambda i: (candidates[i].predicted_step_s, candidates[i].devices))
    best = candidates[chosen]
    candidates = [c if i == chosen else _why_not(c, best, budget_bytes)
                  for i, c in enumerate(candidates)]
    return Distribution(
        devices=devices, budget_bytes=budget_bytes, batch_size=batch_size,
        candidates=tuple(candidates), chosen=chosen,
        communication="none (one device)" if comm is None else comm.describe(),
    )


def _candidate(factory: Factory, batch_size: int, devices: int, microbatches: int,
               budget_bytes: int | None, comm: Any) -> Candidate | None:
    if batch_size % (devices * microbatches):
        return None
    micro = batch_size // (devices * microbatches)
    with new_fake_mode():
        workload = factory(micro)
    # From the second microbatch on, the gradients accumulate in place: live through the
    # step, as a loop that zeroes them with set_to_none=False holds them.
    workload.set_to_none = microbatches == 1
    chain = chain_of(workload, cost_model="roofline", fake=True)
    extra = _bucket_bytes(workload) if devices > 1 else 0
    unplanned = simulate(chain, flat(len(chain)))
    least = min_feasible_bytes(chain)[0] + extra
    plan = None
    peak, compute = unplanned.peak_bytes + extra, unplanned.compute
    if budget_bytes is not None and peak > budget_bytes and least <= budget_bytes:
        plan = solve(chain, budget_bytes - extra, "optimal")
        peak, compute = plan.peak_bytes + extra, plan.compute
    allreduce = comm.seconds(extra) if devices > 1 else 0.0
    return Candidate(
        strategy="accumulate" if devices == 1 else "ddp", devices=devices,
        microbatches=microbatches, microbatch_size=micro,
        fits=budget_bytes is None or peak <= budget_bytes,
        predicted_step_s=microbatches * compute + allreduce,
        ranks=tuple(Rank(rank=r, predicted_peak_bytes=peak) for r in range(devices)),
        least_budget_bytes=least, plan=plan)


def _bucket_bytes(workload: Workload) -> int:
    """DDP's gradient buckets: a copy of every gradient (``gradient_as_bucket_view=False``)."""
    return sum(rounded_bytes(p.numel() * p.element_size(), p.device)
               for p in workload.model.parameters() if p.requires_grad)


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
