"""A compiled step run under a :class:`memprop.plan.compiled.CompiledPlan`, and measured.

NOTE [ The knobs are active when the step compiles ]
``activation_memory_budget`` is read by the partitioner when AOTAutograd compiles, not when the
compiled code runs: a forward that compiles (its first call, and every recompile: a new shape,
a guard that fails) must run inside ``torch._functorch.config.patch``. :class:`CompiledPlanModule`
calls its compiled function inside the patch every time (and with the backward lowered at the
same moment, ``force_non_lazy_backward_lowering``). dynamo keeps compiled code on the code
object of the frame it compiles, and its guards pass for any module of the class whatever the
config: a forward compiled elsewhere (the user's own ``torch.compile``, another plan's budget)
would be found there. So each module compiles a function with a code object of its own
(``memprop.trace.aot``'s fresh call) that calls the model: dynamo traces it, and the model's
forward inlined in it, afresh. AOTAutograd's cache keys on functorch's config (the budget
included) and inductor's on the partitioned graph, so a hit there is the same step. The head
option is installed once, while the module lives (``remove_head`` takes it off: installed per
call, its hooks would be new objects at each step, which dynamo guards on, and every step
would recompile); the key/value cache of a Hugging Face model is off in each call, as when the
plan was traced.

Known limitations: a graph break resumes in the model's own frames, whose compiled code is
shared with other compiles of the class (planning refuses graph breaks: ``fullgraph``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memprop.devices.allocator import AllocatorMeter, allocator_source, step_state_tensors
from memprop.loop import training_step, zero_gradients
from memprop.plan.compiled import CompiledPlan
from memprop.run.measure import gradients_close, timed_steps
from memprop.trace.aot import fresh_call
from memprop.trace.caches import without_caches
from memprop.trace.compiled import original
from memprop.trace.head import chunked_head
from memprop.workload import Workload, restore_state, save_state

__all__ = ["COMPILED_GRADIENT_RTOL", "CompiledPlanModule", "CompiledRunResult", "compiled_module",
           "run_compiled"]

COMPILED_GRADIENT_RTOL = 1e-4
"""A compiled step's gradients against the eager unplanned step's from the same parameters, in
units of each gradient's largest eager magnitude: inductor's kernels sum in another order (and
fuse, keeping intermediates in registers), recomputation under a lower AMB changes nothing
further. Only the first step's are compared: AdamW carries each step's rounding into the next
parameters and amplifies it where a gradient is near 0 (NOTE [ How close the chunked gradients
are ] in ``memprop.trace.head``)."""


class CompiledPlanModule(nn.Module):
    """``module`` whose forward runs ``torch.compile``'d under ``plan``'s knobs (NOTE [ The
    knobs are active when the step compiles ]); the same parameters, and the model's own
    ``state_dict`` keys."""

    def __init__(self, module: nn.Module, plan: CompiledPlan) -> None:
        super().__init__()
        self.module = module
        self.plan = plan
        self._compiled = torch.compile(fresh_call("memprop_planned_step"), dynamic=False)
        self._head = contextlib.ExitStack()
        self._head.enter_context(chunked_head(original(module), plan.head_chunks))
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._functorch.config as functorch_config

        plain = original(self.module)
        with functorch_config.patch(activation_memory_budget=self.plan.activation_memory_budget,
                                    force_non_lazy_backward_lowering=True), \
                without_caches(plain):
            return self._compiled(plain, args, kwargs)

    def remove_head(self) -> None:
        """Take the head option off the model (it stays installed while this module lives:
        installed per call, its hooks would be new objects each step, and dynamo's guards on
        them would recompile the step every time)."""
        self._head.close()


def compiled_module(model: nn.Module, plan: CompiledPlan) -> CompiledPlanModule:
    """``model`` (compiled or not: its original module is compiled again) run under ``plan``."""
    return CompiledPlanModule(original(model), plan)


_PREFIX = "module."


def _strip_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                  local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + key[len(prefix + _PREFIX):]] = state_dict.pop(key)


def _add_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if not any(k.startswith(prefix + _PREFIX) for k in state_dict):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)


@dataclass(frozen=True, kw_only=True, slots=True)
class CompiledRunResult:
    """A compiled plan's real steps against the eager unplanned step's."""

    plan: CompiledPlan
    steps: int
    allocator_step_peaks_bytes: tuple[int, ...]
    """The allocator's peak of each measured compiled step, the loop's first step first (its
    compile is outside the measured region)."""
    baseline_allocator_step_peaks_bytes: tuple[int, ...]
    """The same of the eager unplanned steps."""
    allocator_source: str
    step_s: float
    baseline_step_s: float
    gradients_match: bool
    """The first step's gradients within ``COMPILED_GRADIENT_RTOL`` of the eager step's."""
    gradients_rtol: float = COMPILED_GRADIENT_RTOL

    @property
    def allocator_peak_bytes(self) -> int:
        return max(self.allocator_step_peaks_bytes)

    def to_dict(self) -> dict[str, Any]:
        peak = self.allocator_peak_bytes
        base = max(self.baseline_allocator_step_peaks_bytes)
        return {
            **self.plan.to_dict(),
            "measured": {
                "peak_bytes": peak, "step_peaks_bytes": list(self.allocator_step_peaks_bytes),
                "step_s": self.step_s, "baseline_step_s": self.baseline_step_s,
                "baseline_peak_bytes": base,
                "baseline_step_peaks_bytes": list(self.baseline_allocator_step_peaks_bytes),
                "source": self.allocator_source, "steps": self.steps,
                "allocator_peak_bytes": peak,
                "allocator_step_peaks_bytes": list(self.allocator_step_peaks_bytes),
                "baseline_allocator_peak_bytes": base,
                "baseline_allocator_step_peaks_bytes": list(
                    self.baseline_allocator_step_peaks_bytes),
                "allocator_source": self.allocator_source,
            },
            "gradients_match": self.gradients_match,
            "gradients_rtol": self.gradients_rtol,
        }


MEASURED_STEPS = 3
"""Steps measured one by one: the loop's first step and two steady-state ones."""


def run_compiled(workload: Workload, plan: CompiledPlan, steps: int = 5,
                 measured_steps: int = MEASURED_STEPS) -> CompiledRunResult:
    """``measured_steps + steps`` real steps of ``workload`` compiled under ``plan``, then as
    many eager unplanned from the same start; each measured step's peak by the allocator
    (``memprop.devices.allocator``, never the ledger). The step compiles before the first
    measured one (a forward, its state put back). The workload ends as the eager run left it."""
    plain = original(workload.model)
    device = next((p.device for p in plain.parameters()), workload.input_tensors[0].device)
    start = save_state(workload)
    compiled = compiled_module(plain, plan)
    with _model(workload, compiled):
        workload.forward()  # the compile, outside the measured steps
        restore_state(workload, start)
        planned = _run(workload, steps, measured_steps, device)
    compiled.remove_head()
    restore_state(workload, start)
    with _model(workload, plain), without_caches(plain):
        eager = _run(workload, steps, measured_steps, device)
    return CompiledRunResult(
        plan=plan, steps=steps,
        allocator_step_peaks_bytes=planned.peaks,
        baseline_allocator_step_peaks_bytes=eager.peaks,
        allocator_source=allocator_source(device),
        step_s=planned.step_s, baseline_step_s=eager.step_s,
        gradients_match=gradients_close(planned.first_gradients, eager.first_gradients, device,
                                        COMPILED_GRADIENT_RTOL))


@dataclass(frozen=True, slots=True)
class _Steps:
    peaks: tuple[int, ...]
    first_gradients: list[torch.Tensor | None]
    step_s: float


def _run(workload: Workload, steps: int, measured_steps: int, device: torch.device) -> _Steps:
    peaks: list[int] = []
    first: list[torch.Tensor | None] = []
    for index in range(measured_steps):
        zero_gradients(workload)  # outside the measured region (NOTE [ What c10 reports ... ])
        with AllocatorMeter(device, step_state_tensors(workload)) as meter:
            training_step(workload)
        assert meter.result is not None
        peaks.append(meter.result.peak_bytes)
        if index == 0:
            first = [None if p.grad is None else p.grad.detach().clone()
                     for p in workload.model.parameters()]
    return _Steps(tuple(peaks), first, timed_steps(workload, steps, device))


@contextlib.contextmanager
def _model(workload: Workload, model: nn.Module) -> Iterator[None]:
    was, workload.model = workload.model, model
    try:
        yield
    finally:
        workload.model = was
