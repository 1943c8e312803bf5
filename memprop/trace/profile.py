"""``memprop.profile``: one traced training step and one traced inference pass, as a report.

Every figure here comes from the storage ledger (``memprop.trace.ledger``); on real tensors the
allocator's own count of the same step and pass (``memprop.devices.allocator``: c10's CPU
allocator through torch.profiler, ``torch.cuda.max_memory_allocated`` on a GPU) is read beside
it, by a mechanism that shares nothing with the ledger (``measured``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memprop._version import __version__
from memprop.closed_form import closed_form_for
from memprop.devices import get_device, gpu_layers
from memprop.devices.allocator import AllocatorPeak, StepProbe
from memprop.devices.reconcile import Layer
from memprop.errors import UsageError
from memprop.trace.compiled import COMPILED_GRAPHS_NOTE, original
from memprop.trace.fake import (
    device_of,
    fake_mode_of,
    new_fake_mode,
    to_fake_workload,
)
from memprop.trace.ledger import Category, StorageLedger, op_name
from memprop.trace.repeated import trace_reusing_blocks
from memprop.trace.stages import ChainCosts, StageStats
from memprop.trace.step import StepTrace, TrainingTrace, trace_inference, trace_training
from memprop.units import format_bytes
from memprop.workload import Inputs, Workload, to_workload

__all__ = ["Measured", "MemoryTotals", "Profile", "SavedTensor", "Timeline", "profile",
           "trace_chain"]

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class SavedTensor:
    """One storage that autograd kept for backward at the end of the forward pass."""

    id: int
    """The storage's index on the ledger."""
    op: str
    """The aten op that created it (``relu``, ``_log_softmax``...)."""
    module: str
    """The qualified name of the module whose forward created it ('' for the loss)."""
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    born: int
    """Op clock tick of its creation in the forward pass."""
    freed: int | None
    """Op clock tick after which it died in the backward pass; None if still alive at the end."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryTotals:
    parameters_bytes: int
    buffers_bytes: int
    """Buffers (BatchNorm's running statistics...): part of the model, not trained."""
    gradients_bytes: int
    """Every ``.grad`` at the end of the step."""
    optimizer_state_bytes: int
    """The optimizer's state at the end of the step."""
    inputs_bytes: int
    """Inputs, targets, and constants the step read that are not parameters or buffers."""
    saved_activations_bytes: int
    """Storages autograd keeps for backward at the end of the forward pass, parameters and
    inputs excluded, each counted once."""
    second_order_saved_bytes: int
    """With ``create_graph=True``: what the backward pass itself saves (the second-order graph),
    alive at the end of backward. 0 otherwise."""
    training_peak_bytes: int
    """The peak of a steady-state step: the optimizer's state allocated before it starts, the
    gradients as the loop's ``zero_grad`` leaves them."""
    first_step_peak_bytes: int | None
    """The peak of the loop's first step (its optimizer creates its state inside ``step()``);
    None when the workload arrived with that state already made."""
    inference_peak_bytes: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Measured:
    """The allocator's own peaks of the traced steady step and inference pass
    (``memprop.devices.allocator``), each the bytes live before it plus the allocator's rise."""

    training_peak_bytes: int
    inference_peak_bytes: int
    source: str
    """Where the figures come from and how far to trust them."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeline:
    """Live bytes per category at every op tick of the training step: the chart's data."""

    phases: tuple[str, ...]
    ops: tuple[str, ...]
    modules: tuple[str, ...]
    curves: dict[str, tuple[int, ...]]
    forward_end: int
    backward_end: int
    peak_tick: int

    def peak_op(self) -> dict[str, Any]:
        """The op whose outputs make the training peak: its name (``op``), the module that ran
        it (``module``, None outside any), its tick (``tick``, in the ticks the saved tensors'
        ``born`` and ``freed`` use) and the step's last tick (``last_tick``); all None when
        the peak is at no op."""
        if not 0 <= self.peak_tick < len(self.ops):
            return {"op": None, "module": None, "tick": None, "last_tick": None}
        return {"op": self.ops[self.peak_tick], "module": self.modules[self.peak_tick] or None,
                "tick": self.peak_tick, "last_tick": len(self.ops) - 1}


@dataclass(frozen=True, kw_only=True, slots=True)
class Profile:
    """Where one training step's memory goes, and how it compares with inference."""

    tool: dict[str, str]
    device: dict[str, Any]
    workload: dict[str, Any]
    memory: MemoryTotals
    peak_breakdown: dict[str, int]
    """Live bytes per category at the moment of the training peak."""
    peak_phase: str
    """forward, backward or optimizer: when the training peak happened."""
    measured: Measured | None
    saved_tensors: tuple[SavedTensor, ...]
    """The ledger of saved storages, largest first."""
    stages: tuple[StageStats, ...]
    chain: ChainCosts | None
    """The stages and the memory outside them, as the planner needs them (None if the model
    is not a chain)."""
    blocks_note: str
    """Which run of blocks the planner sees and which others qualified, or why there is none."""
    loss_note: str
    timeline: Timeline
    closed_form: dict[str, int] | None
    """For the built-in MLP: the same totals from the closed-form formulas."""
    trace_s: float
    """Seconds spent tracing (every pass)."""
    notes: tuple[str, ...] = ()
    """How the step was traced, where the report should say it (a model put in train())."""
    gpu_layers: tuple[Layer, ...] | None = None
    """On a GPU: the ledger's training peak, the allocator's peaks and NVML's figures, each gap
    explained (``memprop.devices.reconcile``); None elsewhere."""

    @property
    def training_peak_bytes(self) -> int:
        return self.memory.training_peak_bytes

    @property
    def first_step_peak_bytes(self) -> int | None:
        return self.memory.first_step_peak_bytes

    @property
    def required_bytes(self) -> int:
        """The least budget under which every step of the loop fits: the larger of the
        steady-state and first-step training peaks."""
        return max(self.training_peak_bytes, self.first_step_peak_bytes or 0)

    @property
    def inference_peak_bytes(self) -> int:
        return self.memory.inference_peak_bytes

    @property
    def saved_activations_bytes(self) -> int:
        return self.memory.saved_activations_bytes

    @property
    def training_to_inference(self) -> float:
        return self.training_peak_bytes / max(1, self.inference_peak_bytes)

    def to_dict(self, *, timeline: bool = False) -> dict[str, Any]:
        """DESIGN's profile document (``schema_version: 1``)."""
        document: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "tool": dict(self.tool),
            "device": dict(self.device),
            "workload": dict(self.workload),
            "memory": asdict(self.memory),
            "peak": {"phase": self.peak_phase, "breakdown": dict(self.peak_breakdown),
                     **self.timeline.peak_op()},
            "measured": None if self.measured is None else asdict(self.measured),
            "saved_tensors": [
                {**asdict(t), "shape": list(t.shape)} for t in self.saved_tensors
            ],
            "stages": [s.to_dict() for s in self.stages],
            "chain": None if self.chain is None else {
                k: v for k, v in self.chain.to_dict().items() if k != "stages"
            },
            "loss": self.loss_note,
            "notes": list(self.notes),
            "blocks_note": self.blocks_note,
            "closed_form": self.closed_form,
        }
        if self.gpu_layers is not None:
            document["gpu_layers"] = [asdict(layer) for layer in self.gpu_layers]
        if timeline:
            document["timeline"] = {
                **{k: v for k, v in asdict(self.timeline).items() if k != "curves"},
                "curves": {k: list(v) for k, v in self.timeline.curves.items()},
            }
        return document


def profile(
    model: nn.Module | Workload,
    inputs: Inputs | None = None,
    loss_fn: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    fake: bool = False,
    *,
    targets: torch.Tensor | None = None,
    create_graph: bool = False,
    set_to_none: bool | None = None,
) -> Profile:
    """Trace the steady-state training step and one inference pass of ``model(*inputs)``.

    The training peak is the steady state's: the step as every step from the second on runs
    it, with the optimizer's state allocated and the gradients as ``zero_grad(set_to_none=...)``
    leaves them (``set_to_none=True``, torch's default, unless said). When the optimizer has
    no state yet, its first step is traced too (it creates the state) and its peak reported as
    ``first_step_peak_bytes``. These are real steps: gradients accumulate into ``.grad`` and
    the optimizer steps, as in any training loop. With ``fake=True`` (or a model built inside a
    fake-tensor mode) nothing is allocated and the user's model is not touched; the figures
    are the same, to the byte. ``create_graph=True`` traces a backward that keeps its own graph
    (for second derivatives) and reports what that graph saves.
    """
    workload = to_workload(model, inputs, loss_fn=loss_fn, targets=targets,
                           optimizer=optimizer, set_to_none=set_to_none)
    workload, mode = _in_mode(workload, fake)
    fake = mode is not None
    device = device_of(workload)
    backend = None if fake else get_device(device)
    probes = None if fake else (StepProbe(workload, device, training=False),
                                StepProbe(workload, device, training=True))
    with mode if mode is not None else contextlib.nullcontext():
        # NOTE [ Identical blocks traced once ] (memprop.trace.repeated)
        reused = trace_reusing_blocks(workload, create_graph=create_graph) if fake else None
        if reused is not None and reused.training is not None and reused.inference is not None:
            inference, training = reused.inference, reused.training
        else:
            inference = _traced(trace_inference, workload,
                                None if probes is None else probes[0])
            training = trace_training(workload, create_graph=create_graph,
                                      device=None if probes is None else probes[1])
            if reused is not None:
                training = dataclasses.replace(training, notes=(*training.notes, reused.note))
    measured = None
    if probes is not None and probes[0].last is not None and probes[1].last is not None:
        measured = _measured(training=probes[1].last, inference=probes[0].last,
                             what=_what_was_measured(workload, training.notes))
    return _assemble(workload, training, inference, device, fake, measured, backend)


def trace_chain(workload: Workload, *, fake: bool = False) -> ChainCosts:
    """The chain's costs from the traced steady-state step (no inference pass): what the
    planner needs, for less than a whole profile. A model without a run of blocks is a
    :class:`memprop.errors.UsageError` that says what was found."""
    workload, mode = _in_mode(workload, fake)
    with mode if mode is not None else contextlib.nullcontext():
        reused = trace_reusing_blocks(workload, inference=False, log_ops=True,
                                      ledger=False) if mode is not None else None
        if reused is not None and reused.training is not None:
            steady = reused.training.steady
        else:
            steady = trace_training(workload, log_ops=True).steady
    if steady.chain is None:
        raise UsageError(steady.blocks_note or "the backward never reached the model's blocks")
    return steady.chain


def _in_mode(workload: Workload, fake: bool) -> tuple[Workload, FakeTensorMode | None]:
    """The workload to trace and the fake-tensor mode to trace it in (None: real tensors). A
    real workload asked for fake is mirrored onto fake tensors and left untouched."""
    mode = fake_mode_of(workload)
    if fake and mode is None:
        mode = new_fake_mode()
        workload = to_fake_workload(workload, mode)
    return workload, mode


def _traced(step: Callable[[Workload], StepTrace], workload: Workload,
            probe: StepProbe | None) -> StepTrace:
    """Run a traced step; with a probe, the allocator counts the same step."""
    if probe is None:
        return step(workload)
    probe.reset_peak()
    try:
        trace = step(workload)
    finally:
        probe.peak_bytes()
    return trace


def _assemble(
    workload: Workload,
    traced: TrainingTrace,
    inference: StepTrace,
    device: torch.device,
    fake: bool,
    measured: Measured | None,
    backend: Any,
) -> Profile:
    training = traced.steady
    ledger = training.ledger
    peak_bytes, peak_tick = ledger.peak()
    inference_peak, _ = inference.ledger.peak()
    end_totals = _totals_at_end(ledger)
    saved = [
        r for r in ledger.records
        if r.saved and r.category is Category.SAVED_ACTIVATIONS and r.saved_in_phase == "forward"
        and r.live_at(training.forward_end)
    ]
    second_order = [
        r for r in ledger.records
        if r.saved and r.saved_in_phase == "backward" and r.category not in _NOT_ACTIVATIONS
        and r.live_at(training.backward_end)
    ]
    memory = MemoryTotals(
        parameters_bytes=end_totals[Category.PARAMETERS],
        buffers_bytes=end_totals[Category.BUFFERS],
        gradients_bytes=end_totals[Category.GRADIENTS],
        optimizer_state_bytes=end_totals[Category.OPTIMIZER_STATE],
        inputs_bytes=end_totals[Category.INPUTS],
        saved_activations_bytes=sum(r.bytes for r in saved),
        second_order_saved_bytes=sum(r.bytes for r in second_order),
        training_peak_bytes=peak_bytes,
        first_step_peak_bytes=traced.first_step_peak_bytes,
        inference_peak_bytes=inference_peak,
    )
    saved_tensors = tuple(
        SavedTensor(id=r.index, op=r.op_name, module=r.module, shape=tuple(r.shape),
                    dtype=str(r.dtype).removeprefix("torch."), bytes=r.bytes, born=r.born,
                    freed=r.freed)
        for r in sorted(saved, key=lambda r: (-r.bytes, r.born))
    )
    timeline = _timeline(ledger, training, peak_tick)
    return Profile(
        tool={"name": "memprop", "version": __version__},
        device=_describe(device, backend),
        workload={
            "name": workload.name,
            "batch_size": workload.batch_size,
            "depth": workload.depth,
            "dtype": _dtype_of(workload),
            "device": str(device),
            "mode": "fake" if fake else "real",
            "set_to_none": workload.set_to_none,
            **({"config": dict(workload.config)} if workload.config else {}),
        },
        memory=memory,
        peak_breakdown={c: curve[peak_tick] for c, curve in timeline.curves.items()},
        peak_phase=ledger.ticks[peak_tick][2],
        measured=measured,
        saved_tensors=saved_tensors,
        stages=training.stages,
        chain=training.chain,
        blocks_note=_blocks_note(training),
        loss_note=training.loss_note,
        timeline=timeline,
        gpu_layers=gpu_layers(backend, peak_bytes),
        closed_form=closed_form_for(workload),
        trace_s=training.wall_s + inference.wall_s,
        notes=(*traced.notes, *_frozen_note(workload), *_gap_notes(memory, measured)),
    )


def _blocks_note(training: StepTrace) -> str:
    chain = training.chain
    if chain is None:
        return training.blocks_note
    note = f"blocks: {chain.blocks_found}"
    if chain.other_runs:
        note += (f"; other runs: {'; '.join(chain.other_runs)} (--blocks NAME, or blocks=, "
                 "plans another)")
    return note


_NOT_ACTIVATIONS = (Category.PARAMETERS, Category.BUFFERS, Category.INPUTS, Category.GRADIENTS)


def _totals_at_end(ledger: StorageLedger) -> dict[Category, int]:
    totals = dict.fromkeys(Category, 0)
    for record in ledger.records:
        if record.freed is None:
            totals[record.category] += record.bytes
    return totals


def _measured(*, training: AllocatorPeak, inference: AllocatorPeak, what: str) -> Measured:
    # The probes count the state live before each region themselves (parameters, buffers,
    # inputs, gradients, optimizer state), not from the ledger.
    return Measured(training_peak_bytes=training.peak_bytes,
                    inference_peak_bytes=inference.peak_bytes,
                    source=f"{what}the allocator: {training.source}")


def _frozen_note(workload: Workload) -> tuple[str, ...]:
    """Where some parameters are frozen (a LoRA adapter's base, a fine-tuned head alone), how
    many bytes of them train: only those have gradients and optimizer state."""
    trained = frozen = 0
    for parameter in original(workload.model).parameters():
        size = parameter.numel() * parameter.element_size()
        if parameter.requires_grad:
            trained += size
        else:
            frozen += size
    if not (trained and frozen):
        return ()
    return (f"parameters: {format_bytes(trained)} of them trainable, {format_bytes(frozen)} "
            "frozen (requires_grad=False: no gradients, no optimizer state)",)


MEASURED_GAP_NOTED = 0.02
"""A measured peak this far from the ledger's, as a share of it, is explained in the notes (as
``memprop run`` warns past the same share)."""


def _gap_notes(memory: MemoryTotals, measured: Measured | None) -> tuple[str, ...]:
    """What the report should say where the allocator's count strays from the ledger's."""
    if measured is None:
        return ()
    notes = []
    for what, predicted, counted in (
            ("training", memory.training_peak_bytes, measured.training_peak_bytes),
            ("inference", memory.inference_peak_bytes, measured.inference_peak_bytes)):
        gap = counted - predicted
        if abs(gap) <= MEASURED_GAP_NOTED * predicted:
            continue
        figures = (f"measured {what} peak: the allocator counted {format_bytes(abs(gap))} "
                   f"({abs(gap) / max(1, predicted):.0%}) {'more' if gap > 0 else 'less'} than "
                   "the ledger")
        if gap > 0:
            figures += (": memory a kernel allocates and frees inside one op (scratch, such "
                        "as oneDNN's in convolutions and bfloat16 matmuls on a CPU) is "
                        "invisible to the ledger, whose figures the planner uses; leave that "
                        "room in a budget")
        notes.append(figures)
    return tuple(notes)


def _what_was_measured(workload: Workload, notes: tuple[str, ...]) -> str:
    """Which step the allocator counted, where that is not plainly the one traced: a compiled
    model's training step is inductor's code, run apart from the traced graphs; a compiled
    model traced eagerly was measured eagerly too (NOTE [ Compiled models are traced eagerly ])."""
    if original(workload.model) is workload.model:
        return ""
    if any(note.startswith(COMPILED_GRAPHS_NOTE) for note in notes):
        return ("training: your compiled step itself (inductor's code, one more real step "
                "run outside memprop's tracing); inference: the original module, eagerly; "
                "each by ")
    return ("the original module's eager step and inference pass (the ones traced), not "
            "your compiled step; by ")


def _describe(device: torch.device, backend: Any) -> dict[str, Any]:
    if backend is not None:
        return dict(backend.describe())
    return {"type": device.type, "name": f"fake {device.type} (nothing allocated)"}


def _dtype_of(workload: Workload) -> str:
    for parameter in workload.model.parameters():
        return str(parameter.dtype).removeprefix("torch.")
    tensors = workload.input_tensors
    return str(tensors[0].dtype).removeprefix("torch.") if tensors else "?"


def _timeline(ledger: StorageLedger, training: StepTrace, peak_tick: int) -> Timeline:
    curves = ledger.category_curves()
    ops = tuple(op_name(op) for op, _, _ in ledger.ticks)
    return Timeline(
        phases=tuple(phase for _, _, phase in ledger.ticks),
        ops=ops,
        modules=tuple(module for _, module, _ in ledger.ticks),
        curves={c.value: tuple(v) for c, v in curves.items()},
        forward_end=training.forward_end,
        backward_end=training.backward_end,
        peak_tick=peak_tick,
    )
