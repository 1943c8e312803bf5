"""``run_plan``: real training steps under a plan and without one, measured and compared.

The first step of each run is the measured one, taken from the same starting state (parameters,
buffers, gradients, optimizer state and random state are copied first and put back between the
runs): its peak, on the CPU from the storage ledger (``memprop.trace.ledger``) as a dispatch mode
around the step, on CUDA from ``torch.cuda.max_memory_allocated``; its parameter gradients,
compared bit for bit on the CPU (``torch.equal``) and within a tolerance on a GPU, where kernels
may pick another reduction order. The following ``steps`` steps are timed; times are medians.
BatchNorm statistics (every buffer) are compared at the end of both runs. Every step starts with
the gradients set to None, as ``zero_grad(set_to_none=True)`` leaves them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from memprop.errors import UsageError
from memprop.plan.solvers import Plan
from memprop.run.execute import installed
from memprop.trace.ledger import StorageLedger
from memprop.trace.step import find_chain, register_step_state, training_step, zero_gradients
from memprop.workload import Workload, restore_state, save_state

__all__ = ["RunResult", "run_plan"]

GPU_GRADIENT_RTOL = 1e-4
"""Relative tolerance for gradients on a GPU, where a recomputed kernel may reduce in another
order (cuBLAS and cuDNN pick algorithms per call)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunResult:
    """A plan, and what real steps under it measured against the unplanned step."""

    plan: Plan
    """The plan that ran."""
    steps: int
    """Timed steps per run (after the measured first one)."""
    peak_bytes: int
    """Measured training peak of the first planned step."""
    baseline_peak_bytes: int
    """Measured training peak of the first unplanned step."""
    peak_source: str
    """Where the peaks come from."""
    step_s: float
    """Median seconds of a planned step."""
    baseline_step_s: float
    """Median seconds of an unplanned step."""
    gradients_match: bool
    """Whether the planned step's parameter gradients equal the unplanned step's (bit for bit
    on the CPU, within ``GPU_GRADIENT_RTOL`` on a GPU)."""
    buffers_match: bool
    """Whether every buffer (BatchNorm's running statistics) ends equal in both runs."""

    def to_dict(self) -> dict[str, Any]:
        """DESIGN's run document: the plan, plus what was measured."""
        return {
            **self.plan.to_dict(),
            "measured": {
                "peak_bytes": self.peak_bytes,
                "step_s": self.step_s,
                "baseline_step_s": self.baseline_step_s,
                "baseline_peak_bytes": self.baseline_peak_bytes,
                "source": self.peak_source,
                "steps": self.steps,
            },
            "gradients_match": self.gradients_match,
            "buffers_match": self.buffers_match,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class _Measured:
    peak_bytes: int
    gradients: list[torch.Tensor | None]
    buffers: list[torch.Tensor]
    step_s: float


def run_plan(workload: Workload, plan: Plan, steps: int = 5) -> RunResult:
    """Run ``1 + steps`` training steps of ``workload`` under ``plan``, then as many unplanned
    from the same starting state, and compare. The workload ends in the state of the unplanned
    run (which is the planned run's, when the gradients match)."""
    if steps < 1:
        raise UsageError(f"steps={steps}: give at least 1 step to time")
    chain = find_chain(workload.model)
    if chain is None or len(chain) != len(plan.stage_names):
        found = "no chain" if chain is None else f"a chain of {len(chain)} stages"
        raise UsageError(f"the plan is for {len(plan.stage_names)} stages and the model has "
                         f"{found}: plan this model with memprop.plan first")
    device = next((p.device for p in workload.model.parameters()), workload.inputs[0].device)
    start = save_state(workload)
    with installed(chain, plan.tree):
        planned = _run(workload, steps, device)
    restore_state(workload, start)
    baseline = _run(workload, steps, device)
    return RunResult(
        plan=plan,
        steps=steps,
        peak_bytes=planned.peak_bytes,
        baseline_peak_bytes=baseline.peak_bytes,
        peak_source=("torch.cuda.max_memory_allocated" if device.type == "cuda"
                     else "the storage ledger (every storage's birth and death)"),
        step_s=planned.step_s,
        baseline_step_s=baseline.step_s,
        gradients_match=_same(planned.gradients, baseline.gradients, device),
        buffers_match=_same(list(planned.buffers), list(baseline.buffers), device, exact=True),
    )


def _run(workload: Workload, steps: int, device: torch.device) -> _Measured:
    zero_gradients(workload)
    peak = _measured_step(workload, device)
    gradients = [None if p.grad is None else p.grad.detach().clone()
                 for p in workload.model.parameters()]
    times = []
    for _ in range(steps):
        zero_gradients(workload)
        _sync(device)
        started = time.perf_counter()
        training_step(workload)
        _sync(device)
        times.append(time.perf_counter() - started)
    buffers = [b.detach().clone() for b in workload.model.buffers()]
    return _Measured(peak_bytes=peak, gradients=gradients, buffers=buffers,
                     step_s=statistics.median(times))


def _measured_step(workload: Workload, device: torch.device) -> int:
    ledger = StorageLedger()
    register_step_state(ledger, workload, training=True)
    if device.type == "cuda":
        # The allocator's peak counts every tensor of the process (cuBLAS workspaces, other
        # models); like profile, count the step's own state once, then its rise over the step.
        state_bytes = ledger.live_after_bytes()[0]
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        training_step(workload)
        torch.cuda.synchronize(device)
        return state_bytes + int(torch.cuda.max_memory_allocated(device)) - before
    with ledger:
        training_step(workload)
    return ledger.peak()[0]



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _same(a: list[torch.Tensor | None], b: list[torch.Tensor | None], device: torch.device,
          *, exact: bool = False) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            if x is not y:
                return False
        elif exact or device.type != "cuda":
            if not torch.equal(x, y):
                return False
        elif not torch.allclose(x, y, rtol=GPU_GRADIENT_RTOL, atol=0.0):
            return False
    return True

