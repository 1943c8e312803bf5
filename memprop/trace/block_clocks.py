"""Where each block ran on a traced step's clock: hooks that note it, for the construction of
a deeper step from a shallower one (NOTE [ Identical blocks traced once ] in
``memprop.trace.repeated``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from memprop.loop import tensors_in
from memprop.trace.calls import CONTAINERS
from memprop.trace.ledger import StorageLedger, active_ledger

__all__ = ["BlockClocks", "Bounds"]


@dataclass(slots=True)
class Bounds:
    """Where the blocks ran on one ledger's clock."""

    starts: dict[int, int] = field(default_factory=dict)
    stops: dict[int, int] = field(default_factory=dict)
    outputs: dict[int, int] = field(default_factory=dict)
    """Block by block: the clock when the backward reached the node of its output."""
    first_input: int | None = None
    """The clock when the backward reached the node of the first block's input."""
    calls: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Every container item's first forward call: (start, stop) on the clock."""
    updates: dict[int, int] = field(default_factory=dict)
    """Block by block: the clock before the optimizer's first op on its parameters (their
    gradients, their state)."""
    updated: int | None = None
    """The clock before the optimizer's first op on other parameters after the last block's."""


def _grad_node(value: Any) -> Any:
    return next((t.grad_fn for t in tensors_in(value) if t.grad_fn is not None), None)


class BlockClocks:
    """Hooks that note, for every ledger active while they are, where each block ran."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module],
                 optimizer: torch.optim.Optimizer | None) -> None:
        self.bounds: dict[int, Bounds] = {}
        self._handles: list[Any] = []
        position = {id(block): i for i, block in enumerate(blocks)}
        self._blocks = blocks
        self._watch: _Updates | None = None
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        for name, container in model.named_modules():
            if not isinstance(container, CONTAINERS):
                continue
            for key, item in container._modules.items():
                if item is None:
                    continue
                qualified = f"{name}.{key}" if name else key
                self._handles.append(item.register_forward_pre_hook(
                    self._enter(qualified, position.get(id(item))), with_kwargs=True))
                self._handles.append(item.register_forward_hook(
                    self._leave(qualified, position.get(id(item))), with_kwargs=True))

    def _of(self) -> tuple[StorageLedger, Bounds] | None:
        ledger = active_ledger()
        if ledger is None or ledger.phase != "forward":
            return None
        return ledger, self.bounds.setdefault(id(ledger), Bounds())

    def _enter(self, name: str, block: int | None) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            found = self._of()
            if found is None:
                return
            ledger, bounds = found
            bounds.calls.setdefault(name, (ledger.clock, -1))
            if block is not None:
                bounds.starts.setdefault(block, ledger.clock)
                if block == 0:
                    self._mark((args, kwargs), ledger, bounds, None)
        return hook

    def _leave(self, name: str, block: int | None) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            found = self._of()
            if found is None:
                return
            ledger, bounds = found
            start, stop = bounds.calls[name]
            if stop < 0:
                bounds.calls[name] = (start, ledger.clock)
            if block is not None and block not in bounds.stops:
                bounds.stops[block] = ledger.clock
                self._mark(output, ledger, bounds, block)
        return hook

    @staticmethod
    def _mark(value: Any, ledger: StorageLedger, bounds: Bounds, block: int | None) -> None:
        node = _grad_node(value)
        if node is None:
            return

        def prehook(grad_outputs: Any) -> None:
            if block is None:
                if bounds.first_input is None:
                    bounds.first_input = ledger.clock
            else:
                bounds.outputs.setdefault(block, ledger.clock)

        node.register_prehook(prehook)

    def _before_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        ledger = active_ledger()
        if ledger is None:
            return
        owner: dict[int, int] = {}
        for i, block in enumerate((None, *self._blocks)):
            for parameter in (block.parameters() if block is not None else
                              (p for group in optimizer.param_groups for p in group["params"])):
                tensors = [parameter, parameter.grad,
                           *tensors_in(list(optimizer.state.get(parameter, {}).values()))]
                for tensor in tensors:
                    if isinstance(tensor, torch.Tensor):
                        owner[id(tensor.untyped_storage())] = i - 1
        self._watch = _Updates(owner, len(self._blocks), ledger,
                               self.bounds.setdefault(id(ledger), Bounds()))
        self._watch.__enter__()

    def _after_step(self, optimizer: torch.optim.Optimizer | None, *args: Any) -> None:
        if self._watch is not None:
            self._watch.__exit__(None, None, None)
            self._watch = None

    def remove(self) -> None:
        """The hooks off (and the optimizer's watch, should its step have raised)."""
        self._after_step(None)
        for handle in self._handles:
            handle.remove()


class _Updates(TorchDispatchMode):
    """Inside an optimizer's step: the clock before its first op on each block's parameters,
    gradients or state (``owner``: their storages' block, -1 for other parameters')."""

    def __init__(self, owner: dict[int, int], depth: int, ledger: StorageLedger,
                 bounds: Bounds) -> None:
        super().__init__()
        self.owner = owner
        self.last = depth - 1
        self.ledger = ledger
        self.bounds = bounds

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        bounds = self.bounds
        for tensor in tensors_in((args, kwargs or {})):
            block = self.owner.get(id(tensor.untyped_storage()))
            if block is None:
                continue
            if block >= 0:
                bounds.updates.setdefault(block, self.ledger.clock)
            elif self.last in bounds.updates and bounds.updated is None:
                bounds.updated = self.ledger.clock
        return func(*args, **(kwargs or {}))
