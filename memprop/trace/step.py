"""Drive one training step (and one inference pass) under the storage ledger.

The driver owns everything that is not the ledger's hot path: registering what exists before the
step, the saved-tensors hooks that mark what autograd keeps, the module calls
(``memprop.trace.calls``), and the final categories (gradients, optimizer state). After the step,
the run of blocks is found among the calls (``memprop.trace.blocks``) and measured as the planner's
stages (``memprop.trace.stages``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memprop.blame import user_code
from memprop.loop import state_signature, tensors_in, training_step, zero_gradients
from memprop.trace.blocks import find_run, why_none
from memprop.trace.caches import caching_configs
from memprop.trace.calls import CallRecorder
from memprop.trace.compiled import (
    COMPILED_BLOCKS_NOTE,
    eager_model,
    measured_compiled_step,
    original,
    step_as_traced,
)
from memprop.trace.fake import sized_at_worst, worst_case_note
from memprop.trace.ledger import Category, StorageLedger
from memprop.trace.stages import ChainCosts, StageStats, chain_costs
from memprop.units import format_bytes
from memprop.workload import Workload

__all__ = [
    "StepTrace",
    "TrainingTrace",
    "register_step_state",
    "trace_inference",
    "trace_training",
    "trace_training_step",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class StepTrace:
    """A finished ledger and the landmarks of the step it recorded."""

    ledger: StorageLedger
    forward_end: int
    """Tick of the last forward op (the loss included)."""
    backward_end: int
    """Tick of the last backward op."""
    end: int
    """Tick of the last op of the step (the optimizer's, when there is one)."""
    stages: tuple[StageStats, ...]
    chain: ChainCosts | None
    """The chain's costs, when the model has a run of blocks."""
    loss_note: str
    """How the loss was obtained, for the report."""
    wall_s: float
    """Seconds the traced step took (tracing overhead included)."""
    blocks_note: str = ""
    """Why the model has no run of blocks to plan (empty when it has one)."""


def optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return list(tensors_in(list(optimizer.state.values())))


def register_step_state(ledger: StorageLedger, workload: Workload, *, training: bool) -> None:
    """Put what exists before the step on the ledger: parameters, buffers, inputs and, for a
    training step, targets, existing gradients and the optimizer's state."""
    model = workload.model
    parameters = list(model.named_parameters())
    for name, parameter in parameters:
        ledger.register([parameter], Category.PARAMETERS, name)
    for name, buffer in model.named_buffers():
        ledger.register([buffer], Category.BUFFERS, name)
    ledger.register(workload.input_tensors, Category.INPUTS, "inputs")
    if not training:
        return  # prediction has no labels, gradients or optimizer
    if workload.targets is not None:
        ledger.register([workload.targets], Category.INPUTS, "targets")
    ledger.register(
        [p.grad for _, p in parameters if p.grad is not None], Category.GRADIENTS, "grad"
    )
    if workload.optimizer is not None:
        ledger.register(optimizer_state(workload.optimizer), Category.OPTIMIZER_STATE,
                        "optimizer")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingTrace:
    """The steady-state step of the user's loop, and what its first step peaked at
    (NOTE [ The steady state ] in ``memprop.loop``)."""

    steady: StepTrace
    """A step that starts as every step from the second on does: the optimizer's state
    allocated, the gradients as ``zero_grad`` leaves them."""
    first_step_peak_bytes: int | None
    """The training peak of the loop's first step (state created inside ``optimizer.step()``);
    equal to the steady step's when the first step changes no state; None when the workload
    arrived with its state already made (mid-training), so its first step was not seen."""
    device_rise_bytes: int | None
    """With a device to measure: how far its own high-water mark rose over the steady step."""
    notes: tuple[str, ...]
    """What the report should say about how the step was traced."""


def trace_training(
    workload: Workload, *, create_graph: bool = False, device: Any = None,
    log_ops: bool = False,
) -> TrainingTrace:
    """The steady-state training step of ``workload``, reached as the loop reaches it.

    The gradients are zeroed as the loop zeroes them, and one step is traced. If that step
    changed what the next one starts with (the optimizer made its state, or gradients that
    the loop keeps were made), it was the first step: its peak is kept, the gradients are
    zeroed again and the next step, the steady one, is traced. Real steps train the model, as
    in the loop. A model left in ``eval()`` is traced in ``train()`` (and put back), since that
    is how a training loop runs it; the notes say so. ``device`` (a memory backend) measures
    its own high-water mark over the steady step."""
    notes: list[str] = []
    # NOTE [ Compiled models are traced eagerly ] (memprop.trace.compiled): a compiled model's
    # step is traced from its graphs, but for planning (log_ops), where the eager module that
    # plans run is; NOTE [ Sizes that depend on values ] (memprop.trace.fake)
    traced_as = step_as_traced(workload, notes, planning=log_ops, create_graph=create_graph)
    with _training_mode(original(workload.model), notes), traced_as as graphs, \
            sized_at_worst() as worst:
        zero_gradients(workload)
        before = state_signature(workload)
        first = _measured(workload, create_graph, device, log_ops)
        if state_signature(workload) != before:
            zero_gradients(workload)
            steady = _measured(workload, create_graph, device, log_ops)
            first_peak: int | None = first[0].ledger.peak()[0]
        else:
            # The step made no state: it was already a steady one. It was also the loop's
            # first unless the workload arrived with state (gradients kept, optimizer state).
            steady = first
            first_peak = None if any(before) else first[0].ledger.peak()[0]
        if graphs is not None and device is not None:  # the allocator counts inductor's step
            steady = (steady[0], measured_compiled_step(workload, device))
    trace, rise = steady
    if graphs is not None:
        trace = dataclasses.replace(trace, blocks_note=COMPILED_BLOCKS_NOTE)
    if worst:
        notes.append(worst_case_note(worst))
    _note_caches(workload, trace, notes)
    if trace.chain is not None and first is not steady:
        first_optimizer = _optimizer_moment(first[0]) if workload.optimizer is not None else 0
        trace = dataclasses.replace(trace, chain=dataclasses.replace(
            trace.chain,
            optimizer_peak_bytes=max(trace.chain.optimizer_peak_bytes, first_optimizer),
            first_step_peak_bytes=first_peak,
        ))
    return TrainingTrace(steady=trace, first_step_peak_bytes=first_peak,
                         device_rise_bytes=rise, notes=tuple(notes))


def _measured(workload: Workload, create_graph: bool, device: Any, log_ops: bool
              ) -> tuple[StepTrace, int | None]:
    if device is None:
        return trace_training_step(workload, create_graph=create_graph,
                                   log_ops=log_ops), None
    before = device.current_bytes()
    device.reset_peak()
    trace = trace_training_step(workload, create_graph=create_graph, log_ops=log_ops)
    return trace, max(0, device.peak_bytes() - before)


def _optimizer_moment(trace: StepTrace) -> int:
    """The highest live total of the step's optimizer phase (what backward left included)."""
    live, after = trace.ledger._live_curves()
    return max([after[trace.backward_end], *live[trace.backward_end + 1 : trace.end + 1]])


def _note_caches(workload: Workload, trace: StepTrace, notes: list[str]) -> None:
    if not caching_configs(workload.model):
        return
    kept = sum(s.persistent_bytes for s in trace.chain.stages) if trace.chain else 0
    held = f" ({format_bytes(kept)} here)" if kept else ""
    name = type(original(workload.model)).__name__
    notes.append(f"{name}'s config has use_cache=True: its forward "
                 f"keeps every layer's keys and values{held}, which a training step never "
                 "reads; set model.config.use_cache = False in your loop to save them. Plans "
                 "run with it off, and plan's unplanned peak is without it")


@contextlib.contextmanager
def _training_mode(model: nn.Module, notes: list[str]) -> Iterator[None]:
    if model.training:
        yield
        return
    notes.append(f"{type(model).__name__} was in eval(): the training step was traced in "
                 "train(), as a training loop runs it (dropout and batch statistics on), and "
                 "the model was put back in eval() after")
    with _mode(model, training=True):
        yield


def trace_training_step(workload: Workload, *, create_graph: bool = False,
                        log_ops: bool = False) -> StepTrace:
    """One forward, backward and (when given) optimizer step, every storage on the ledger, from
    the state the workload is in (see :func:`trace_training` for the loop's steady state).
    ``log_ops`` also logs every op with its FLOPs and the bytes it moves (for a cost model
    that prices memory-bound work, and for the ops a block may keep)."""
    ledger = StorageLedger(log_ops=log_ops)
    register_step_state(ledger, workload, training=True)
    recorder = CallRecorder(ledger, workload.model)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        recorder.on_saved(ledger.mark_saved(tensor))
        return tensor

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    marks: dict[str, int] = {}
    backward_end_s = 0.0

    def on_phase(phase: str) -> None:
        nonlocal backward_end_s
        if phase == "backward":
            marks["forward_end"] = ledger.clock
            ledger.module = ""
        elif phase == "optimizer":
            marks["backward_end"] = ledger.clock
            # The optimizer's in-place updates make no storage: they share the backward's last
            # tick, and only their place in the op log tells them apart.
            marks["backward_end_op"] = len(ledger.ops or ())
            backward_end_s = time.perf_counter()
            if workload.optimizer is None:
                return  # no optimizer phase: the step ends with the backward
        elif phase == "end":
            marks["end"] = ledger.clock
        ledger.phase = phase
        if phase == "end":
            grads = [p.grad for p in workload.model.parameters() if p.grad is not None]
            ledger.reclassify(grads, Category.GRADIENTS)
            if workload.optimizer is not None:
                ledger.reclassify(optimizer_state(workload.optimizer), Category.OPTIMIZER_STATE)

    started = time.perf_counter()
    try:
        with ledger, torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            loss_note = training_step(workload, create_graph=create_graph, on_phase=on_phase)
    finally:
        recorder.remove()
    forward_end, backward_end, end = marks["forward_end"], marks["backward_end"], marks["end"]
    ledger.close()
    wall_s = time.perf_counter() - started
    chain = None
    root = recorder.calls[0] if recorder.calls else None
    run = None if root is None else find_run(recorder.calls, ledger.records, workload.model,
                                             named=workload.blocks)
    if run is not None and root is not None:
        chain = chain_costs(run, recorder, ledger, root=root, forward_started_s=started,
                            forward_end=forward_end, backward_end=backward_end,
                            backward_end_s=backward_end_s, end=end,
                            backward_end_op=marks["backward_end_op"],
                            has_optimizer=workload.optimizer is not None)
    note = "" if chain is not None else why_none(recorder.calls, workload.model)
    return StepTrace(
        ledger=ledger,
        forward_end=forward_end,
        backward_end=backward_end,
        end=end,
        stages=() if chain is None else chain.stages,
        chain=chain,
        loss_note=loss_note,
        wall_s=wall_s,
        blocks_note=note,
    )


@contextlib.contextmanager
def _mode(model: nn.Module, *, training: bool) -> Iterator[None]:
    """``model.train(training)`` until the block exits, then every module's own flag back."""
    flags = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def trace_inference(workload: Workload) -> StepTrace:
    """The forward pass as prediction runs it: ``eval()`` and ``torch.inference_mode()``."""
    ledger = StorageLedger()
    register_step_state(ledger, workload, training=False)
    started = time.perf_counter()
    with eager_model(workload, []), _mode(workload.model, training=False), \
            torch.inference_mode(), ledger:
        ledger.phase = "forward"
        with user_code("the model's forward (inference)"):
            output = workload.forward()
        end = ledger.clock
        del output
    ledger.close()
    return StepTrace(
        ledger=ledger,
        forward_end=end,
        backward_end=end,
        end=end,
        stages=(),
        chain=None,
        loss_note="",
        wall_s=time.perf_counter() - started,
    )
