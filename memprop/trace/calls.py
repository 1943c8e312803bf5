"""Every module call of a traced step: where it starts and stops on the ledger's clock, which
storages go in and come out, and when the backward reaches it.

The recorder knows nothing of chains: it records every call, and marks the backward at the
calls that may be blocks (items of an ``nn.Sequential`` or an ``nn.ModuleList``) and at the
model's own output. ``memprop.trace.blocks`` reads the calls afterwards to find the run of blocks
through which the activation flows; ``memprop.trace.stages`` turns the run into the planner's
stages. One recorder serves every model, so nothing has to be known about a model before its
step is traced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from memprop.loop import tensors_in
from memprop.trace.ledger import StorageLedger, StorageRecord

__all__ = ["Call", "CallRecorder", "Mark", "Slot"]

CONTAINERS = (nn.Sequential, nn.ModuleList)
"""The modules whose items may be blocks."""


@dataclass(kw_only=True, slots=True)
class Call:
    """One forward call of one module."""

    index: int
    name: str
    """The module's qualified name ('' for the model itself)."""
    module: nn.Module = field(repr=False)
    container: str | None
    """The qualified name of the module's parent when that is an ``nn.Sequential`` or an
    ``nn.ModuleList`` (the module may be a block); None otherwise."""
    depth: int
    """How deep the call is nested in other calls (0 for the model's own)."""
    start: int
    """Clock tick when the call began: its forward region is ``(start, stop]``."""
    stop: int = 0
    first_event: int = 0
    """The recorder's event count at the call's start: a tensor saved while the event count is
    in ``(first_event, last_event)`` was saved by an op of this call."""
    last_event: int = 0
    first_op: int = 0
    """With the ledger's ops logged: the call's ops are ``ledger.ops[first_op:last_op]``."""
    last_op: int = 0
    started_s: float = 0.0
    stopped_s: float = 0.0
    inputs: list[StorageRecord] = field(default_factory=list, repr=False)
    """Every storage among the call's tensor arguments, the main input first."""
    outputs: list[StorageRecord] = field(default_factory=list, repr=False)
    """Every storage among its tensor outputs, the main output first."""
    input_slot: Slot | None = field(default=None, repr=False)
    """Where the backward's arrival at the main input's node is written."""
    output_slot: Slot | None = field(default=None, repr=False)
    """The same for the main output's node."""

    @property
    def main_input(self) -> StorageRecord | None:
        return self.inputs[0] if self.inputs else None

    @property
    def main_output(self) -> StorageRecord | None:
        return self.outputs[0] if self.outputs else None

    @property
    def input_mark(self) -> Mark | None:
        """When the backward reached the node that made the main input (None: it did not)."""
        return None if self.input_slot is None else self.input_slot.mark

    @property
    def output_mark(self) -> Mark | None:
        """When the backward reached the node that made the main output."""
        return None if self.output_slot is None else self.output_slot.mark


@dataclass(frozen=True, kw_only=True, slots=True)
class Mark:
    """The backward reaching a node: the clock then, the time, and the gradient it received."""

    tick: int
    time_s: float
    grads: tuple[StorageRecord, ...]


@dataclass(slots=True)
class Slot:
    """One autograd node's mark, written the first time the backward reaches it."""

    mark: Mark | None = None


class CallRecorder:
    """Forward hooks on every module of ``model``: they keep the ledger's ``module`` field
    current and record every call made during the forward phase."""

    def __init__(self, ledger: StorageLedger, model: nn.Module) -> None:
        self.ledger = ledger
        self.calls: list[Call] = []
        self.marks: list[Mark] = []
        self.event = 0
        """Counts call entries, exits and saves, so that each save falls inside its calls."""
        self.saves: list[tuple[int, StorageRecord]] = []
        """(event, record) for every tensor autograd saved during the forward."""
        self._stack: list[Call] = []
        self._handles: list[Any] = []
        parents = {child: name for name, module in model.named_modules()
                   if isinstance(module, CONTAINERS) for child in module.children()}
        for name, module in model.named_modules():
            container = parents.get(module)
            self._handles.append(module.register_forward_pre_hook(
                self._enter(name or type(model).__name__, module, container), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._leave(), with_kwargs=True))
        # One slot per autograd node (by id: nodes live as long as the step's graph, which
        # outlives the recording).
        self._slots: dict[int, Slot] = {}

    def _enter(self, name: str, module: nn.Module, container: str | None) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            ledger = self.ledger
            call = None
            if ledger.phase == "forward":
                self.event += 1
                call = Call(index=len(self.calls), name=name, module=module,
                            container=container, depth=len(self._stack), start=ledger.clock,
                            first_event=self.event, started_s=time.perf_counter(),
                            first_op=len(ledger.ops) if ledger.ops is not None else 0,
                            inputs=self._records((args, kwargs)))
                self.calls.append(call)
                if container is not None or not self._stack:
                    call.input_slot = self._slot((args, kwargs))
            self._stack.append(call)  # type: ignore[arg-type]
            ledger.module = name

        return hook

    def _leave(self) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            call = self._stack.pop()
            if call is not None:
                self.event += 1
                call.last_event = self.event
                call.stop = self.ledger.clock
                call.last_op = len(self.ledger.ops) if self.ledger.ops is not None else 0
                call.stopped_s = time.perf_counter()
                call.outputs = self._records(output)
                if call.container is not None or not self._stack:
                    call.output_slot = self._slot(output)
            outer = next((c for c in reversed(self._stack) if c is not None), None)
            self.ledger.module = outer.name if outer is not None else ""

        return hook

    def on_saved(self, record: StorageRecord) -> None:
        """Called by the saved-tensors pack hook: autograd keeps ``record``'s storage."""
        if self.ledger.phase == "forward":
            self.event += 1
            self.saves.append((self.event, record))

    def _records(self, value: Any) -> list[StorageRecord]:
        found: dict[int, StorageRecord] = {}
        for tensor in tensors_in(value):
            record = self.ledger.record_of(tensor)
            if record is not None:
                found.setdefault(record.index, record)
        return list(found.values())

    def _slot(self, value: Any) -> Slot | None:
        """The slot of the node that made the first tensor of ``value`` that has one, with a
        prehook that fills it when the backward first reaches that node."""
        node = next((t.grad_fn for t in tensors_in(value) if t.grad_fn is not None), None)
        if node is None:
            return None
        slot = self._slots.get(id(node))
        if slot is None:
            slot = self._slots[id(node)] = Slot()

            def prehook(grad_outputs: Any) -> None:
                if slot.mark is None:
                    slot.mark = Mark(tick=self.ledger.clock, time_s=time.perf_counter(),
                                     grads=tuple(self._records(grad_outputs)))
                    self.marks.append(slot.mark)

            node.register_prehook(prehook)
        return slot

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
