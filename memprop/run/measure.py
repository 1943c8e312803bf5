"""``run_plan``: real training steps under a plan and without one, measured and compared.

Both runs start from the same state (parameters, buffers, gradients, optimizer state and random
state are copied first and put back between the runs) and run the loop of ``memprop.loop``.
The first ``measured_steps`` steps of each run are measured one by one, so that the loop's first
step (the optimizer creates its state) and its steady state (from the second step on, the state
is live throughout) are both seen, each by two mechanisms that share nothing: the storage ledger
(``memprop.trace.ledger``, the model memprop predicts with) as a dispatch mode around the step,
and the allocator's own count (``memprop.devices.allocator``: c10's CPU allocator through
torch.profiler's memory events, ``torch.cuda.max_memory_allocated`` on CUDA). After each
measured step the parameter gradients of the two runs are compared, bit for bit on the CPU
(``torch.equal``) and within a tolerance on a GPU, where kernels may pick another reduction
order. Then ``steps`` more steps are timed; times are medians. BatchNorm statistics (every
buffer) are compared at the end of both runs.

:func:`check_run` turns a result into what must be said about it, judged by the allocator's figure
(the independent one): the budget exceeded (an error), the prediction missed by more than
``PREDICTION_TOLERANCE`` (a warning that names the cause), and the ledger astray from the
allocator by as much (a warning: the ledger, and so the prediction, missed something).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memprop.devices.allocator import AllocatorMeter, allocator_source, step_state_tensors
from memprop.errors import BudgetExceededError, PlanCheckError, UsageError
from memprop.loop import training_step, zero_gradients
from memprop.plan.solvers import Plan
from memprop.run.install import installed
from memprop.trace.caches import without_caches
from memprop.trace.compiled import eager_model
from memprop.trace.head import STEP_GRADIENT_RTOL
from memprop.trace.ledger import StorageLedger
from memprop.trace.stages import StageRef
from memprop.trace.step import register_step_state
from memprop.units import format_bytes
from memprop.workload import Workload, restore_state, save_state

if TYPE_CHECKING:
    from memprop.run.scratch import Scratch

__all__ = ["PREDICTION_TOLERANCE", "RunResult", "check_run", "gradients_close", "not_run",
           "run_plan", "timed_steps"]

GPU_GRADIENT_RTOL = 1e-4
"""Relative tolerance for gradients on a GPU, where a recomputed kernel may reduce in another
order (cuBLAS and cuDNN pick algorithms per call)."""
PREDICTION_TOLERANCE = 0.02
"""How far a measured peak may stray from the plan's prediction, as a fraction of the
prediction, before memprop says so. The model is exact to the byte on the CPU chains of the
tests; the known gaps are over-predictions (a gradient summed in the autograd engine, as the
built-in model's weight decay does, by up to 1.4%)."""
MEASURED_STEPS = 3
"""Steps measured one by one: the loop's first step and two steady-state ones."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunResult:
    """A plan, and what real steps under it measured against the unplanned step."""

    plan: Plan
    """The plan that ran."""
    steps: int
    """Timed steps per run (after the measured ones)."""
    step_peaks_bytes: tuple[int, ...]
    """The ledger's training peak of each measured step under the plan, the loop's first step
    first."""
    baseline_step_peaks_bytes: tuple[int, ...] | None
    """The same without the plan; None when the unplanned steps were not run (they would not
    fit the device)."""
    peak_source: str
    """Where the ledger's peaks come from."""
    allocator_step_peaks_bytes: tuple[int, ...] = ()
    """The allocator's peak of the same steps (``memprop.devices.allocator``): the figure
    the prediction and the budget are checked against."""
    baseline_allocator_step_peaks_bytes: tuple[int, ...] | None = None
    """The allocator's peaks of the unplanned steps."""
    allocator_source: str = ""
    """How the allocator's figure is obtained."""
    scratch_bytes: int = 0
    """The largest scratch of one op (``memprop.run.scratch``) that the plan was made around:
    planned for its budget less this; 0 where none was measured."""
    scratch_op: str = ""
    """The op that allocated it."""
    measured_step_s: float | None = None
    """Median seconds of a measured planned step (under the ledger and the allocator's
    profiler), against ``step_s`` of the untraced ones: what measuring costs."""
    step_s: float
    """Median seconds of a planned step."""
    baseline_step_s: float | None
    """Median seconds of an unplanned step."""
    gradients_match: bool | None
    """Whether the planned steps' parameter gradients equal the unplanned steps' after every
    measured step (bit for bit on the CPU, within ``GPU_GRADIENT_RTOL`` on a GPU; under the
    head option, which sums in chunks, the first step's, from the same parameters, within
    ``memprop.trace.head.STEP_GRADIENT_RTOL`` of each gradient's largest magnitude: later
    steps start from parameters the rounding moved apart)."""
    buffers_match: bool | None
    """Whether every buffer (BatchNorm's running statistics) ends equal in both runs."""

    @property
    def peak_bytes(self) -> int:
        """The highest measured peak under the plan, over every measured step."""
        return max(self.step_peaks_bytes)

    @property
    def baseline_peak_bytes(self) -> int | None:
        steps = self.baseline_step_peaks_bytes
        return None if steps is None else max(steps)

    @property
    def allocator_peak_bytes(self) -> int:
        """The allocator's highest peak under the plan, over every measured step (the ledger's
        when the allocator was not read)."""
        return max(self.allocator_step_peaks_bytes or self.step_peaks_bytes)

    @property
    def baseline_allocator_peak_bytes(self) -> int | None:
        steps = self.baseline_allocator_step_peaks_bytes
        return None if not steps else max(steps)

    def to_dict(self) -> dict[str, Any]:
        """DESIGN's run document: the plan, plus what was measured."""
        return {
            **self.plan.to_dict(),
            "measured": {
                "peak_bytes": self.peak_bytes,
                "step_peaks_bytes": list(self.step_peaks_bytes),
                "step_s": self.step_s,
                "baseline_step_s": self.baseline_step_s,
                "baseline_peak_bytes": self.baseline_peak_bytes,
                "baseline_step_peaks_bytes": (None if self.baseline_step_peaks_bytes is None
                                              else list(self.baseline_step_peaks_bytes)),
                "source": self.peak_source,
                "steps": self.steps,
                "allocator_peak_bytes": self.allocator_peak_bytes,
                "allocator_step_peaks_bytes": list(self.allocator_step_peaks_bytes),
                "baseline_allocator_peak_bytes": self.baseline_allocator_peak_bytes,
                "baseline_allocator_step_peaks_bytes": (
                    None if self.baseline_allocator_step_peaks_bytes is None
                    else list(self.baseline_allocator_step_peaks_bytes)),
                "allocator_source": self.allocator_source,
                "measured_step_s": self.measured_step_s,
                "scratch_bytes": self.scratch_bytes,
                "scratch_op": self.scratch_op,
            },
            "gradients_match": self.gradients_match,
            "buffers_match": self.buffers_match,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class _Measured:
    peaks: tuple[int, ...]
    allocator_peaks: tuple[int, ...]
    gradients: list[list[torch.Tensor | None]]
    buffers: list[torch.Tensor]
    step_s: float
    measured_step_s: float


def run_plan(workload: Workload, plan: Plan, steps: int = 5,
             measured_steps: int = MEASURED_STEPS, *, baseline: bool = True,
             scratch: Scratch | None = None) -> RunResult:
    """Run ``measured_steps + steps`` training steps of ``workload`` under ``plan``, then as
    many unplanned from the same starting state, and compare. The workload ends in the state of
    the unplanned run (which is the planned run's, when the gradients match). With
    ``baseline=False`` (the unplanned step does not fit the device) only the planned steps
    run, and nothing is compared. ``scratch``: the kernels' scratch the plan was made around
    (:func:`memprop.run.scratch.plan_around`), which the checks allow for."""
    if steps < 1 or measured_steps < 1:
        raise UsageError(f"steps={steps}, measured_steps={measured_steps}: give at least 1 of "
                         "each")
    # A plan is made on a compiled model's original module and runs on it, eagerly, both ways
    # (NOTE [ Compiled models are traced eagerly ]): dynamo would compile the ledger's dispatch
    # mode into the step, once per op, until its recompile limit.
    with eager_model(workload, []):
        return _run_plan(workload, plan, steps, measured_steps, baseline, scratch)


def _run_plan(workload: Workload, plan: Plan, steps: int, measured_steps: int,
              baseline: bool, scratch: Scratch | None) -> RunResult:
    device = next((p.device for p in workload.model.parameters()),
                  workload.input_tensors[0].device)
    start = save_state(workload) if baseline else None
    with installed(workload.model, plan.stage_names, plan.tree, plan.selective,
                   plan.draws_random, head_chunks=plan.head_chunks) as calls:
        planned = _run(workload, steps, measured_steps, device)
    if calls.expected and calls.count == 0:
        raise PlanCheckError(not_run(workload.model, plan))
    unplanned = None
    if start is not None:
        restore_state(workload, start)
        with without_caches(workload.model):  # the same step as the planned one, plan apart
            unplanned = _run(workload, steps, measured_steps, device)
    return RunResult(
        plan=plan,
        steps=steps,
        step_peaks_bytes=planned.peaks,
        baseline_step_peaks_bytes=None if unplanned is None else unplanned.peaks,
        peak_source="the storage ledger (every storage's birth and death, seen by a dispatch "
                    "mode)",
        allocator_step_peaks_bytes=planned.allocator_peaks,
        baseline_allocator_step_peaks_bytes=None if unplanned is None else
        unplanned.allocator_peaks,
        allocator_source=allocator_source(device),
        scratch_bytes=0 if scratch is None else scratch.bytes,
        scratch_op="" if scratch is None else scratch.op,
        measured_step_s=planned.measured_step_s,
        step_s=planned.step_s,
        baseline_step_s=None if unplanned is None else unplanned.step_s,
        gradients_match=None if unplanned is None else all(
            _same(a, b, device, rtol=STEP_GRADIENT_RTOL if plan.head_chunks else None)
            for a, b in _comparable(plan, planned.gradients, unplanned.gradients)),
        buffers_match=None if unplanned is None else _same(
            list(planned.buffers), list(unplanned.buffers), device, exact=True),
    )


def check_run(result: RunResult) -> tuple[BudgetExceededError | None, str | None]:
    """(an error when a measured step exceeded the budget: the user's outcome, exit 3, said
    with by how much and why; a warning when the measured peak
    strays from the prediction, or the ledger from the allocator, by more than
    ``PREDICTION_TOLERANCE``). "Measured" is the allocator's figure: the mechanism that shares
    nothing with the prediction. Where the plan was made around kernels' scratch, the allocator
    may count up to the scratch above the prediction and the ledger unremarked."""
    plan = result.plan
    measured = result.allocator_peak_bytes
    steps = result.allocator_step_peaks_bytes or result.step_peaks_bytes
    peaks = ", ".join(format_bytes(p) for p in steps)
    error = None
    if measured > plan.budget_bytes:
        error = BudgetExceededError(
            f"the planned steps peaked at {format_bytes(measured)} by the allocator's count "
            f"(steps: {peaks}), {format_bytes(measured - plan.budget_bytes)} over the budget "
            f"of {format_bytes(plan.budget_bytes)}: {_why_over(result)}; the budget does not "
            "hold for this step: raise it by that much")
    # Planned around the scratch, the allocator may count up to the scratch above the ledger.
    scratch = result.scratch_bytes
    warnings = [mismatch(plan.peak_bytes, measured if not scratch else min(
        measured, max(plan.peak_bytes, measured - scratch)),
        "the allocator measured over the planned steps")]
    if result.allocator_step_peaks_bytes:
        warnings.append(ledger_astray(result.peak_bytes, measured if not scratch else min(
            measured, max(result.peak_bytes, measured - scratch))))
    if warnings[0] is None and result.peak_bytes > plan.peak_bytes:
        # Within the tolerance, but over: the plan's model misses memory the step holds, and a
        # budget set at the prediction would be broken by that much.
        warnings.append(f"the planned steps peaked at {format_bytes(result.peak_bytes)} by the "
                        f"ledger, {result.peak_bytes - plan.peak_bytes:,} B over the plan's "
                        f"prediction of {format_bytes(plan.peak_bytes)}: the plan's model of "
                        "this step misses memory it holds")
    said = [w for w in warnings if w is not None]
    return error, "; ".join(said) if said else None


def _why_over(result: RunResult) -> str:
    """Why the allocator counted a planned step above its budget, in words."""
    ledger, allocator = result.peak_bytes, result.allocator_peak_bytes
    gap = allocator - ledger
    if ledger > result.plan.budget_bytes:
        return (f"the ledger's peak of the same steps, {format_bytes(ledger)}, is over it too: "
                f"the plan's model (predicted {format_bytes(result.plan.peak_bytes)}) missed "
                "memory the step holds")
    if result.scratch_bytes:
        return (f"the allocator counted {format_bytes(gap)} above the ledger, whose figures "
                f"the plan was made from, though it was planned around "
                f"{format_bytes(result.scratch_bytes)} of kernels' scratch ({result.scratch_op})")
    return (f"the allocator counted {format_bytes(gap)} above the ledger, whose figures the "
            "plan was made from: kernels' scratch (memory an op allocates and frees inside "
            "itself, such as oneDNN's in a CPU convolution), which the plan did not measure")


def ledger_astray(ledger: int, allocator: int) -> str | None:
    """A sentence when the ledger's peak of a step strays from the allocator's by more than
    the tolerance: the ledger missed memory the step holds, or counted some it does not."""
    if abs(ledger - allocator) <= PREDICTION_TOLERANCE * allocator:
        return None
    return (f"the ledger's peak of the same steps, {format_bytes(ledger)}, is "
            f"{(ledger - allocator) / allocator:+.1%} off the allocator's "
            f"{format_bytes(allocator)}: the ledger does not see this step's memory as the "
            "allocator does, so its predictions are not to be trusted here")


def mismatch(predicted: int, measured: int, what: str) -> str | None:
    """A sentence when ``measured`` strays from ``predicted`` by more than the tolerance."""
    if abs(measured - predicted) <= PREDICTION_TOLERANCE * predicted:
        return None
    direction = "above" if measured > predicted else "below"
    off = abs(measured - predicted) / predicted
    return (f"the peak {what} is {format_bytes(measured)}, {off:.1%} "
            f"{direction} the plan's prediction of {format_bytes(predicted)} (tolerance "
            f"{PREDICTION_TOLERANCE:.0%}): the chain memprop planned does not hold all of the "
            "step's memory as it predicted")


def not_run(model: torch.nn.Module, plan: Plan) -> str:
    """The message when a plan installed on a model's blocks never ran in its training step."""
    blocks = [n for n in plan.stage_names if StageRef.named(n).is_block]
    where = f"{blocks[0]} .. {blocks[-1]}" if len(blocks) > 1 else ", ".join(blocks)
    return (f"the plan was installed on {type(model).__name__}'s blocks ({where}), but the "
            "training step never called them under it: the plan did not run. The blocks "
            "must be called by the model's forward, in training mode, with gradients on")


def _run(workload: Workload, steps: int, measured_steps: int, device: torch.device
         ) -> _Measured:
    peaks, allocator_peaks, gradients, measured_times = [], [], [], []
    for _ in range(measured_steps):
        zero_gradients(workload)  # outside the measured region: NOTE [ What c10 reports ... ]
        started = time.perf_counter()
        ledger_peak, allocator_peak = _measured_step(workload, device)
        measured_times.append(time.perf_counter() - started)
        peaks.append(ledger_peak)
        allocator_peaks.append(allocator_peak)
        gradients.append([None if p.grad is None else p.grad.detach().clone()
                          for p in workload.model.parameters()])
    step_s = timed_steps(workload, steps, device)
    buffers = [b.detach().clone() for b in workload.model.buffers()]
    return _Measured(peaks=tuple(peaks), allocator_peaks=tuple(allocator_peaks),
                     gradients=gradients, buffers=buffers, step_s=step_s,
                     measured_step_s=statistics.median(measured_times))


def timed_steps(workload: Workload, steps: int, device: torch.device) -> float:
    """The median seconds of ``steps`` training steps of ``workload``, untraced, each from the
    loop's ``zero_grad``."""
    times = []
    for _ in range(steps):
        zero_gradients(workload)
        _sync(device)
        started = time.perf_counter()
        training_step(workload)
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _measured_step(workload: Workload, device: torch.device) -> tuple[int, int]:
    """One step under both mechanisms at once: (the ledger's peak, the allocator's). The ledger
    holds weak references only, so it changes nothing the allocator sees; the allocator counts
    the step's own state live before it (not the process's other tensors, such as cuBLAS's
    workspaces), then its rise over the step."""
    ledger = StorageLedger()
    register_step_state(ledger, workload, training=True)
    meter = AllocatorMeter(device, step_state_tensors(workload))
    with meter, ledger:
        training_step(workload)
    assert meter.result is not None  # the step ended without an exception
    return ledger.peak()[0], meter.result.peak_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _comparable(plan: Plan, planned: list[list[torch.Tensor | None]],
                unplanned: list[list[torch.Tensor | None]]
                ) -> list[tuple[list[torch.Tensor | None], list[torch.Tensor | None]]]:
    """The steps whose gradients are compared: every one, but under the head option only the
    first (NOTE [ How close the chunked gradients are ] in ``memprop.trace.head``: the
    optimizer carries the rounding of one step into the parameters of the next, and AdamW's
    update, divided by the gradient's own scale, amplifies it where gradients are near 0)."""
    pairs = list(zip(planned, unplanned, strict=True))
    return pairs[:1] if plan.head_chunks else pairs


def gradients_close(a: list[torch.Tensor | None], b: list[torch.Tensor | None],
                    device: torch.device, rtol: float) -> bool:
    """Whether each tensor of ``a`` is within ``rtol`` times the largest magnitude of its
    counterpart in ``b`` (None only against None)."""
    return _same(a, b, device, rtol=rtol)


def _same(a: list[torch.Tensor | None], b: list[torch.Tensor | None], device: torch.device,
          *, exact: bool = False, rtol: float | None = None) -> bool:
    """Whether ``a`` equals ``b``: bit for bit (``exact``, or on the CPU), within
    ``GPU_GRADIENT_RTOL`` on a GPU; with ``rtol``, each tensor within ``rtol`` times the largest
    magnitude of its counterpart in ``b``."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            if x is not y:
                return False
        elif rtol is not None and not exact:
            if (x - y).abs().max() > rtol * y.abs().max():
                return False
        elif exact or device.type != "cuda":
            if not torch.equal(x, y):
                return False
        elif not torch.allclose(x, y, rtol=GPU_GRADIENT_RTOL, atol=0.0):
            return False
    return True
