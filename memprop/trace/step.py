"""Drive one training step (and one inference pass) under the storage ledger.

The driver owns everything that is not the ledger's hot path: registering what exists before the
step, the saved-tensors hooks that mark what autograd keeps, module hooks that say which module
and which stage is running, and the final categories (gradients, optimizer state).
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
from memprop.loop import compute_loss, state_signature, tensors_in, zero_gradients
from memprop.trace.ledger import Category, StorageLedger, StorageRecord
from memprop.trace.stages import ChainCosts, StageStats
from memprop.workload import Workload

__all__ = [
    "StepTrace",
    "TrainingTrace",
    "find_chain",
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
    """The chain's costs, when the model is a chain."""
    loss_note: str
    """How the loss was obtained, for the report."""
    wall_s: float
    """Seconds the traced step took (tracing overhead included)."""


def find_chain(model: nn.Module) -> nn.Sequential | None:
    """The ``nn.Sequential`` whose children are the planner's stages.

    The model itself when it is one; else the child that ``model.memprop_chain`` names; else its
    only direct child that is an ``nn.Sequential``. ``None`` when the model is not a chain.
    """
    if isinstance(model, nn.Sequential):
        return model
    named = getattr(model, "memprop_chain", None)
    if isinstance(named, str):
        candidate = getattr(model, named, None)
        return candidate if isinstance(candidate, nn.Sequential) else None
    sequentials = [m for m in model.children() if isinstance(m, nn.Sequential)]
    return sequentials[0] if len(sequentials) == 1 else None


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return list(tensors_in(list(optimizer.state.values())))


class _ModuleTracker:
    """Forward hooks that keep the ledger's ``module`` and ``stage`` fields current, and the
    per-stage landmarks the stage table is made of."""

    def __init__(self, ledger: StorageLedger, model: nn.Module) -> None:
        self.ledger = ledger
        self.stack: list[str] = []
        self.handles: list[Any] = []
        chain = find_chain(model)
        self.stage_modules = list(chain.children()) if chain is not None else []
        names = {m: n or type(model).__name__ for n, m in model.named_modules()}
        self.stage_names = [names.get(m, str(i)) for i, m in enumerate(self.stage_modules)]
        n = len(self.stage_modules)
        self.forward_ticks: list[tuple[int, int]] = [(0, 0)] * n
        self.forward_s = [0.0] * n
        self.inputs: list[list[StorageRecord]] = [[] for _ in range(n)]
        self.outputs: list[list[StorageRecord]] = [[] for _ in range(n)]
        self.saved: list[dict[int, StorageRecord]] = [{} for _ in range(n)]
        # Backward regions: (stage, tick, time) each time autograd reaches a stage's output.
        self.backward_marks: list[tuple[int, int, float]] = []
        # The gradient of each stage's output as its backward received it.
        self.output_grads: dict[int, list[StorageRecord]] = {}
        self._started = 0.0
        self._start_tick = 0
        for name, module in model.named_modules():
            name = name or type(model).__name__  # the root module, by its class
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave()))
        for index, module in enumerate(self.stage_modules):
            self.handles.append(module.register_forward_pre_hook(self._stage_enter(index)))
            self.handles.append(module.register_forward_hook(self._stage_leave(index)))

    def _enter(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append(name)
            self.ledger.module = name

        return hook

    def _leave(self) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.stack.pop()
            self.ledger.module = self.stack[-1] if self.stack else ""

        return hook

    def _stage_enter(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if self.ledger.phase != "forward":
                return
            self.ledger.stage = index
            self.inputs[index] = self._records(args)
            self._start_tick = self.ledger.clock
            self._started = time.perf_counter()

        return hook

    def _stage_leave(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.ledger.phase != "forward":
                return
            self.forward_s[index] = time.perf_counter() - self._started
            self.forward_ticks[index] = (self._start_tick, self.ledger.clock)
            self.outputs[index] = self._records(output)
            self.ledger.stage = None
            for tensor in tensors_in(output):
                if tensor.grad_fn is not None:
                    tensor.grad_fn.register_prehook(self._backward_mark(index))
                    break

        return hook

    def _backward_mark(self, index: int) -> Any:
        def prehook(grad_outputs: Any) -> None:
            self.ledger.stage = index
            self.backward_marks.append((index, self.ledger.clock, time.perf_counter()))
            self.output_grads.setdefault(index, self._records(grad_outputs))

        return prehook

    def _records(self, value: Any) -> list[StorageRecord]:
        found: dict[int, StorageRecord] = {}
        for tensor in tensors_in(value):
            record = self.ledger.record_of(tensor)
            if record is not None:
                found[record.index] = record
        return list(found.values())

    def on_saved(self, record: StorageRecord) -> None:
        stage = self.ledger.stage
        if stage is not None and self.ledger.phase == "forward":
            self.saved[stage][record.index] = record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def stage_stats(self, backward_end: int, backward_end_s: float) -> tuple[StageStats, ...]:
        ledger = self.ledger
        live, after = ledger._live_curves()
        regions: dict[int, tuple[int, int, float]] = {}
        marks = self.backward_marks
        for position, (index, tick, started) in enumerate(marks):
            if position + 1 < len(marks):
                stop_tick, stopped = marks[position + 1][1], marks[position + 1][2]
            else:
                stop_tick, stopped = backward_end, backward_end_s
            regions.setdefault(index, (tick, stop_tick, stopped - started))
        gradient_records = [r for r in ledger.records if r.category is Category.GRADIENTS]
        stats = []
        for index, name in enumerate(self.stage_names):
            inputs = {r.index for r in self.inputs[index]}
            outputs = {r.index for r in self.outputs[index]}
            saved = self.saved[index]
            own = [
                r for r in saved.values()
                if r.index not in inputs
                and r.category not in (Category.PARAMETERS, Category.BUFFERS, Category.INPUTS)
            ]
            start, stop = self.forward_ticks[index]
            back_start, back_stop, back_s = regions.get(index, (0, -1, 0.0))
            # NOTE [ Gradients summed in the engine ] With two contributions to one parameter
            # (the seed's weight decay), the engine holds the first from the loss's backward
            # until the stage's own arrives, then sums them into the .grad. The first is part of
            # loss_residual_bytes and is freed here; counting only what is born here makes the
            # planner over-predict by it (safe, and pinned under 2% in the calibration tests).
            gradient_bytes = sum(
                r.bytes for r in gradient_records if back_start < r.born <= back_stop
            )
            stats.append(StageStats(
                index=index,
                name=name,
                forward_s=self.forward_s[index],
                backward_s=back_s,
                flops=ledger.stage_flops.get((index, "forward"), 0),
                backward_flops=ledger.stage_flops.get((index, "backward"), 0),
                input_bytes=sum(r.bytes for r in self.inputs[index]),
                output_bytes=sum(r.bytes for r in self.outputs[index]),
                saved_bytes=sum(r.bytes for r in own),
                saves_input=any(i in saved for i in inputs),
                saves_output=any(o in saved for o in outputs),
                forward_peak_bytes=_rise(live, after, start, stop),
                backward_peak_bytes=_rise(live, after, back_start, back_stop),
                gradient_bytes=gradient_bytes,
            ))
        return tuple(stats)

    def chain_costs(
        self, stages: tuple[StageStats, ...], backward_end: int, end: int, *, has_optimizer: bool
    ) -> ChainCosts | None:
        if not stages or not self.backward_marks:
            return None
        live, after = self.ledger._live_curves()
        forward_stop = self.forward_ticks[-1][1]
        last = len(stages) - 1
        backward_start = next(tick for index, tick, _ in self.backward_marks if index == last)
        # The last stage's backward frees the gradient of the model's output, unless someone
        # else holds it: when the chain's output is the loss itself, that gradient is the seed
        # that torch.autograd.backward holds until the whole backward is over.
        backward_stop = next((tick for index, tick, _ in self.backward_marks
                              if tick > backward_start and index != last), end)
        output_grad_held = any(r.freed is None or r.freed > backward_stop
                               for r in self.output_grads.get(last, []))
        # The optimizer's moment starts with what backward left live; its own temporaries and
        # new state come on top.
        optimizer_ticks = [after[backward_end], *live[backward_end + 1 : end + 1]]
        return ChainCosts(
            stages=stages,
            fixed_bytes=after[0],
            loss_peak_bytes=_rise(live, after, forward_stop, backward_start),
            loss_residual_bytes=after[backward_start] - after[forward_stop],
            optimizer_peak_bytes=max(optimizer_ticks) if has_optimizer else 0,
            traced_peak_bytes=max(live),
            output_grad_held=output_grad_held,
        )


def _rise(live: list[int], after: list[int], start: int, stop: int) -> int:
    """How far the live total rose above where it stood at ``start``, over ``start+1..stop``."""
    if stop <= start:
        return 0
    return max(0, max(live[start + 1 : stop + 1]) - after[start])


def register_step_state(ledger: StorageLedger, workload: Workload, *, training: bool) -> None:
    """Put what exists before the step on the ledger: parameters, buffers, inputs and, for a
    training step, targets, existing gradients and the optimizer's state."""
    model = workload.model
    parameters = list(model.named_parameters())
    for name, parameter in parameters:
        ledger.register([parameter], Category.PARAMETERS, name)
    for name, buffer in model.named_buffers():
        ledger.register([buffer], Category.BUFFERS, name)
    ledger.register(workload.inputs, Category.INPUTS, "inputs")
    if not training:
        return  # prediction has no labels, gradients or optimizer
    if workload.targets is not None:
        ledger.register([workload.targets], Category.INPUTS, "targets")
    ledger.register(
        [p.grad for _, p in parameters if p.grad is not None], Category.GRADIENTS, "grad"
    )
    if workload.optimizer is not None:
        ledger.register(_optimizer_state(workload.optimizer), Category.OPTIMIZER_STATE,
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
    workload: Workload, *, create_graph: bool = False, device: Any = None
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
    with _training_mode(workload.model, notes):
        zero_gradients(workload)
        before = state_signature(workload)
        first = _measured(workload, create_graph, device)
        if state_signature(workload) != before:
            zero_gradients(workload)
            steady = _measured(workload, create_graph, device)
            first_peak: int | None = first[0].ledger.peak()[0]
        else:
            # The step made no state: it was already a steady one. It was also the loop's
            # first unless the workload arrived with state (gradients kept, optimizer state).
            steady = first
            first_peak = None if any(before) else first[0].ledger.peak()[0]
    trace, rise = steady
    if trace.chain is not None and first is not steady:
        first_optimizer = _optimizer_moment(first[0]) if workload.optimizer is not None else 0
        trace = dataclasses.replace(trace, chain=dataclasses.replace(
            trace.chain,
            optimizer_peak_bytes=max(trace.chain.optimizer_peak_bytes, first_optimizer),
            first_step_peak_bytes=first_peak,
        ))
    return TrainingTrace(steady=trace, first_step_peak_bytes=first_peak,
                         device_rise_bytes=rise, notes=tuple(notes))


def _measured(workload: Workload, create_graph: bool, device: Any
              ) -> tuple[StepTrace, int | None]:
    if device is None:
        return trace_training_step(workload, create_graph=create_graph), None
    before = device.current_bytes()
    device.reset_peak()
    trace = trace_training_step(workload, create_graph=create_graph)
    return trace, max(0, device.peak_bytes() - before)


def _optimizer_moment(trace: StepTrace) -> int:
    """The highest live total of the step's optimizer phase (what backward left included)."""
    live, after = trace.ledger._live_curves()
    return max([after[trace.backward_end], *live[trace.backward_end + 1 : trace.end + 1]])


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


def trace_training_step(workload: Workload, *, create_graph: bool = False) -> StepTrace:
    """One forward, backward and (when given) optimizer step, every storage on the ledger, from
    the state the workload is in (see :func:`trace_training` for the loop's steady state)."""
    ledger = StorageLedger()
    register_step_state(ledger, workload, training=True)
    tracker = _ModuleTracker(ledger, workload.model)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        tracker.on_saved(ledger.mark_saved(tensor))
        return tensor

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    started = time.perf_counter()
    try:
        with ledger, torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            ledger.phase = "forward"
            with user_code("the model's forward"):
                output = workload.model(*workload.inputs)
            loss, loss_note = compute_loss(workload, output)
            forward_end = ledger.clock
            ledger.phase = "backward"
            ledger.module = ""
            ledger.stage = None
            with user_code("the backward pass"):
                loss.backward(create_graph=create_graph)
            backward_end = ledger.clock
            backward_end_s = time.perf_counter()
            ledger.stage = None
            if workload.optimizer is not None:
                ledger.phase = "optimizer"
                with user_code("the optimizer's step"):
                    workload.optimizer.step()
            ledger.phase = "end"
            end = ledger.clock
            grads = [p.grad for p in workload.model.parameters() if p.grad is not None]
            ledger.reclassify(grads, Category.GRADIENTS)
            if workload.optimizer is not None:
                ledger.reclassify(_optimizer_state(workload.optimizer), Category.OPTIMIZER_STATE)
            del output, loss, grads
    finally:
        tracker.remove()
    ledger.close()
    wall_s = time.perf_counter() - started
    stages = tracker.stage_stats(backward_end, backward_end_s)
    return StepTrace(
        ledger=ledger,
        forward_end=forward_end,
        backward_end=backward_end,
        end=end,
        stages=stages,
        chain=tracker.chain_costs(stages, backward_end, end,
                                  has_optimizer=workload.optimizer is not None),
        loss_note=loss_note,
        wall_s=wall_s,
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
    with _mode(workload.model, training=False), torch.inference_mode(), ledger:
        ledger.phase = "forward"
        with user_code("the model's forward (inference)"):
            output = workload.model(*workload.inputs)
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
