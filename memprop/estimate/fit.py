"""``memprop fit``: the largest batch whose training peak fits a budget.

The search traces fake cells only: batch 1 (if it does not fit, nothing does), then doubling
until a batch does not fit, then bisection between the last batch that fits and the first that
does not. It assumes the training peak never falls as the batch grows, which holds for every
model whose tensors scale with the batch. ``real=True`` then runs the batch found for real and
checks its peak against the budget; one more example is over the budget by its traced peak.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memprop.blame import is_fake_kernel_refusal, is_fake_tensor_limit
from memprop.errors import (
    BudgetInfeasibleError,
    MemPropError,
    ModelError,
    OutOfMemoryError,
    WorkloadError,
)
from memprop.estimate.preflight import shortfall
from memprop.estimate.sweep import Build, trace_fake
from memprop.plan.solvers import cli_size, least_budget_words
from memprop.search import largest_true
from memprop.trace.profile import profile
from memprop.units import format_bytes

__all__ = ["FitProbe", "FitResult", "Verification", "fit"]

SCHEMA_VERSION = 1
MAX_BATCH_SIZE = 2**40
"""Where the doubling gives up: a peak that fits at 2**40 examples does not grow with the batch."""

@dataclass(frozen=True, kw_only=True, slots=True)
class FitProbe:
    """One fake trace of the search."""

    batch_size: int
    training_peak_bytes: int
    """What a budget must cover at this batch: the larger of the steady-state and the
    first-step training peaks."""
    fits: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class Verification:
    """The largest batch run for real."""

    batch_size: int
    training_peak_bytes: int
    """The ledger's training peak of the real run (the larger of the first step's and the
    steady state's)."""
    predicted_training_peak_bytes: int
    """The fake trace's, for the same batch: equal to the byte when tracing is exact."""
    measured_peak_bytes: int | None
    """The device's own high-water mark over the step (VmHWM on the CPU: approximate)."""
    fits: bool
    """The real training peak is within the budget."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FitResult:
    """The largest batch that fits, and what is left."""

    workload: dict[str, Any]
    budget_bytes: int
    budget_source: str
    """Where the budget came from: ``--budget`` or the device's free memory, said plainly."""
    max_batch_size: int
    training_peak_bytes: int
    """The traced training peak at ``max_batch_size``: the larger of the steady-state and the
    first-step peaks, what the budget must cover."""
    headroom_bytes: int
    """Budget minus that peak."""
    next_training_peak_bytes: int
    """The traced training peak at ``max_batch_size + 1``: over the budget."""
    probes: tuple[FitProbe, ...]
    """Every fake trace of the search, in order."""
    max_batch_size_with_checkpointing: int | None
    checkpointing_compute_overhead: float | None
    """Extra compute of the plan at that batch, as a fraction of the unplanned step."""
    checkpointing_note: str
    verification: Verification | None
    wall_s: float
    smallest_batch_size: int = 1
    """The smallest batch the model trains with (BatchNorm refuses one sample per channel)."""
    smallest_batch_note: str = ""
    """Why smaller batches do not run, when they do not."""

    def to_dict(self) -> dict[str, Any]:
        """DESIGN's fit document (``schema_version: 1``)."""
        verification = self.verification
        return {
            "schema_version": SCHEMA_VERSION,
            "workload": dict(self.workload),
            "budget_bytes": self.budget_bytes,
            "budget_source": self.budget_source,
            "max_batch_size": self.max_batch_size,
            "max_batch_size_with_checkpointing": self.max_batch_size_with_checkpointing,
            "checkpointing_compute_overhead": self.checkpointing_compute_overhead,
            "checkpointing_note": self.checkpointing_note,
            "smallest_batch_size": self.smallest_batch_size,
            "smallest_batch_note": self.smallest_batch_note,
            "training_peak_bytes": self.training_peak_bytes,
            "headroom_bytes": self.headroom_bytes,
            "next_batch_size": self.max_batch_size + 1,
            "next_training_peak_bytes": self.next_training_peak_bytes,
            "probes": [{"batch_size": p.batch_size, "training_peak_bytes": p.training_peak_bytes,
                        "fits": p.fits} for p in self.probes],
            "verification": None if verification is None else {
                "batch_size": verification.batch_size,
                "training_peak_bytes": verification.training_peak_bytes,
                "predicted_training_peak_bytes": verification.predicted_training_peak_bytes,
                "measured_peak_bytes": verification.measured_peak_bytes,
                "fits": verification.fits,
            },
            "wall_s": self.wall_s,
        }


def fit(
    build: Build,
    *,
    budget_bytes: int,
    budget_source: str = "given",
    depth: int | None = None,
    real: bool = False,
    available_bytes: int | None = None,
    max_overhead: float | None = None,
) -> FitResult:
    """The largest batch size whose fake-traced training peak is at most ``budget_bytes``.

    Raises ``BudgetInfeasibleError`` (with the smallest budget that fits, batch 1's peak) when
    batch 1 does not fit. With ``real``, the batch found is run for real: ``OutOfMemoryError``
    when its predicted peak exceeds ``available_bytes`` (default: the device's available memory).
    """
    start = time.perf_counter()
    probes: list[FitProbe] = []
    peaks: dict[int, int] = {}
    described: dict[str, Any] = {}

    def peak(batch_size: int) -> int:
        if batch_size not in peaks:
            # The user's code raises MemPropErrors (memprop.blame.user_code); anything else
            # is memprop's bug and keeps its traceback.
            result = _trace_for_fit(build, batch_size, depth)
            if not described:
                described.update(result.workload)
            peaks[batch_size] = result.required_bytes
            probes.append(FitProbe(batch_size=batch_size, training_peak_bytes=peaks[batch_size],
                                   fits=peaks[batch_size] <= budget_bytes))
        return peaks[batch_size]

    smallest, smallest_note = _smallest_batch(peak)
    first = peak(smallest)
    if first > budget_bytes:
        raise BudgetInfeasibleError(
            f"budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) is below the training "
            f"peak at batch {smallest}, {least_budget_words(first)}: raise the budget to at "
            f"least {cli_size(first)} or make the model smaller",
            budget_bytes=budget_bytes, min_feasible_bytes=first,
        )
    low = largest_true(lambda b: peak(b) <= budget_bytes, start=smallest, limit=MAX_BATCH_SIZE)
    if low == MAX_BATCH_SIZE:
        raise WorkloadError(
            f"the training peak stays within {format_bytes(budget_bytes)} up to batch "
            f"{MAX_BATCH_SIZE}: it does not grow with the batch size; does the factory use "
            "batch_size?"
        )
    verification = _verify(build, low, depth, peaks[low], budget_bytes, described,
                           available_bytes) if real else None
    with_checkpointing, overhead, note = _with_checkpointing(build, low, depth, budget_bytes,
                                                             max_overhead)
    described = {k: v for k, v in described.items() if k != "batch_size"}
    described["mode"] = "real" if real else "fake"
    return FitResult(
        workload=described, budget_bytes=budget_bytes, budget_source=budget_source,
        max_batch_size=low, training_peak_bytes=peaks[low],
        headroom_bytes=budget_bytes - peaks[low], next_training_peak_bytes=peak(low + 1),
        probes=tuple(probes), max_batch_size_with_checkpointing=with_checkpointing,
        checkpointing_compute_overhead=overhead, checkpointing_note=note,
        verification=verification, wall_s=time.perf_counter() - start,
        smallest_batch_size=smallest, smallest_batch_note=smallest_note,
    )


def _smallest_batch(peak: Callable[[int], int]) -> tuple[int, str]:
    """The smallest batch that traces, 1 or 2 (BatchNorm refuses one value per channel in
    training), and why batch 1 does not when it does not. A model that fails at 2 as well
    raises that failure."""
    try:
        peak(1)
        return 1, ""
    except WorkloadError as error:
        reason = str(error)
    peak(2)
    return 2, f"batch 1 does not run in training: {reason}"


def _verify(
    build: Build, batch_size: int, depth: int | None, predicted: int, budget_bytes: int,
    described: dict[str, Any], available_bytes: int | None,
) -> Verification:
    device = str(described.get("device", "cpu"))
    reason = shortfall(predicted, device, available_bytes=available_bytes)
    if reason is not None:
        raise OutOfMemoryError(
            f"the real run of batch {batch_size} {reason}: nothing was run; lower the budget to "
            "what the device has, to verify by a real run"
        )
    try:
        result = profile(build(batch_size, depth))
        measured = None if result.measured is None else result.measured.training_peak_bytes
        return Verification(
            batch_size=batch_size, training_peak_bytes=result.required_bytes,
            predicted_training_peak_bytes=predicted, measured_peak_bytes=measured,
            fits=result.required_bytes <= budget_bytes,
        )
    finally:
        gc.collect()


_REAL_TENSOR_ADVICE = (": trace on real tensors instead)",
                       ": if the model trains in plain PyTorch, trace it on real tensors)")
"""How memprop.blame ends its refusals of fake tracing: advice for profile, not fit."""


def _trace_for_fit(build: Build, batch_size: int, depth: int | None) -> Any:
    """``trace_fake``, whose refusal of the model (code that reads values, a fake kernel
    stricter than the real one) advises what fit can do: fit searches on fake tensors only, so
    the advice to trace on real tensors is sweep's to follow, a batch at a time."""
    try:
        return trace_fake(build, batch_size, depth)
    except MemPropError as error:
        if not (is_fake_tensor_limit(error) or is_fake_kernel_refusal(error)):
            raise
        # The refusal's own advice (trace on real tensors) is not fit's to follow: left out.
        refusal = str(error)
        for advice in _REAL_TENSOR_ADVICE:
            refusal = refusal.replace(advice, ")")
        raise ModelError(
            f"{refusal}; memprop fit searches on fake tensors only and cannot bisect this model: "
            "measure batches on real tensors with memprop sweep --real --batch 1,2,4,8 (the "
            "same --model) and take the largest whose training peak is within the budget"
            ) from error


def _with_checkpointing(
    build: Build, low: int, depth: int | None, budget_bytes: int, max_overhead: float | None
) -> tuple[int | None, float | None, str]:
    """The largest batch that the planner makes fit (within ``max_overhead`` extra compute,
    as a fraction, when given): more recomputation for a larger batch, so bisection holds.
    A model the planner cannot plan gives no row, and the note says why."""
    from memprop.plan.api import plan

    overheads: dict[int, float] = {}

    def feasible(batch_size: int) -> bool:
        from memprop.trace.fake import new_fake_mode

        with new_fake_mode():
            workload = build(batch_size, depth)
        try:
            # fake=True: sizes that depend on values at their worst case (memprop.trace.fake)
            result = plan(workload, budget=budget_bytes, strategy="optimal", fake=True)
        except BudgetInfeasibleError:
            return False
        if max_overhead is not None and result.compute_overhead > max_overhead:
            return False
        overheads[batch_size] = result.compute_overhead
        return True

    try:
        if not feasible(low):
            return low, 0.0, "the planner found no plan at the largest batch that fits without one"
        found = largest_true(feasible, start=low, limit=MAX_BATCH_SIZE)
    except MemPropError as error:
        return None, None, f"no row: the planner cannot plan this model ({error})"
    cap = "" if max_overhead is None else f", at most {max_overhead:.0%} extra compute"
    return found, overheads.get(found), f"memprop.plan, strategy optimal{cap}"
