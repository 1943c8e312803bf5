"""``memprop.checkpoint``: the user's model, run under a plan, re-planned when the inputs change.

The wrapper holds the model itself (the same parameter and buffer objects, so an optimizer built
before or after it works) and presents the model's own ``state_dict`` keys: it saves and loads
checkpoints interchangeably with the bare model. Its forward installs the plan on the model's
chain (:func:`memprop.run.execute.installed`) and calls the model, so the model's own forward,
hooks and loss code run unchanged.

Plans are cached by the inputs' shapes, dtypes and devices. An input never seen before is
planned on first sight on fake tensors, pricing recomputation in FLOPs, so planning allocates
nothing but a label-sized target tensor (targets given at construction are resized along their
first dimension to the new batch when that dimension was the batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memprop.errors import UsageError
from memprop.plan.api import as_planning_workload, not_a_chain, plan
from memprop.plan.solvers import Plan
from memprop.run.execute import installed
from memprop.trace.fake import new_fake_mode, to_fake_workload
from memprop.trace.step import find_chain
from memprop.units import parse_size
from memprop.workload import Workload

__all__ = ["PlannedModule", "checkpoint"]

_PREFIX = "module."
InputKey = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]


def _key(inputs: tuple[Any, ...]) -> InputKey:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in inputs
                 if isinstance(t, torch.Tensor))


class PlannedModule(nn.Module):
    """``module`` whose training forward runs under the plan for its inputs' shapes."""

    def __init__(self, module: nn.Module, planner: Callable[[tuple[Any, ...]], Plan]) -> None:
        super().__init__()
        chain = find_chain(module)
        if chain is None:
            raise UsageError(not_a_chain(module))
        self.module = module
        self._chain = [chain]  # a list, so nn.Module does not register it a second time
        self._planner = planner
        self.plans: dict[InputKey, Plan] = {}
        """The plans made so far, by the inputs' (shape, dtype, device)."""
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    def plan_for(self, *inputs: Any) -> Plan:
        """The plan for these inputs, made on first sight."""
        key = _key(inputs)
        if key not in self.plans:
            self.plans[key] = self._planner(inputs)
        return self.plans[key]

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self.module(*inputs, **kwargs)
        with installed(self._chain[0], self.plan_for(*inputs).tree):
            return self.module(*inputs, **kwargs)


def _strip_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                  local_metadata: Any) -> None:
    _rename(state_dict, prefix + _PREFIX, prefix)


def _add_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if not any(k.startswith(prefix + _PREFIX) for k in state_dict):
        _rename(state_dict, prefix, prefix + _PREFIX)


def _rename(state_dict: dict[str, Any], old: str, new: str) -> None:
    # In place and in order: the caller owns the dict. Its _metadata (BatchNorm's version, for
    # one) is keyed by module prefixes without the trailing dot, renamed alike.
    def renamed(key: str, old: str, new: str) -> str:
        if key == old.rstrip("."):
            return new.rstrip(".")
        return new + key[len(old):] if key.startswith(old) else key

    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[renamed(key, old, new)] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        entries = list(metadata.items())
        metadata.clear()
        for key, value in entries:
            metadata[renamed(key, old, new)] = value


def checkpoint(
    model: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    budget: int | str,
    strategy: str = "optimal",
    cost_model: str = "flops",
    *,
    loss_fn: Any = None,
    targets: torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> PlannedModule:
    """``model`` wrapped so that its training steps keep under ``budget`` (bytes or a size such
    as ``"2GiB"``), planned now for ``inputs`` and again for every new input shape.

    ``cost_model="flops"`` (the default) plans on fake tensors: nothing is allocated, which
    matters when the unplanned step does not fit. ``"measured"`` traces one real step for the
    first plan (the model is put back as it was); later shapes are always planned in FLOPs.
    ``loss_fn``, ``targets`` and ``optimizer`` make the planner see the step as it will run
    (the loss's and the optimizer's memory); without them the loss is ``output.float().mean()``.
    """
    first = as_planning_workload(model, inputs, loss_fn, targets, optimizer)
    budget_bytes = parse_size(budget)

    def planner(new_inputs: tuple[Any, ...]) -> Plan:
        if _key(new_inputs) == _key(first.inputs) and cost_model == "measured":
            return plan(first, budget=budget_bytes, strategy=strategy, cost_model="measured")
        return plan(_fake_workload(first, new_inputs), budget=budget_bytes, strategy=strategy,
                    cost_model="flops")

    wrapper = PlannedModule(model, planner)
    wrapper.plan_for(*first.inputs)
    return wrapper


def _fake_workload(first: Workload, inputs: tuple[Any, ...]) -> Workload:
    mode = new_fake_mode()
    real = Workload(model=first.model, inputs=tuple(inputs), targets=None,
                    loss_fn=first.loss_fn, optimizer=first.optimizer, name=first.name)
    fake = to_fake_workload(real, mode)
    if first.targets is not None:
        targets = first.targets
        shape = tuple(targets.shape)
        old_batch = first.inputs[0].shape[0] if first.inputs[0].dim() else None
        if shape and inputs and shape[0] == old_batch:
            shape = (inputs[0].shape[0], *shape[1:])
        with mode:
            fake.targets = torch.zeros(shape, dtype=targets.dtype, device=targets.device)
    return fake
