"""``memprop.plan``: profile a workload, build its chain, solve for a budget."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memprop.errors import UsageError
from memprop.plan.chain import COST_MODELS, Chain
from memprop.plan.solvers import STRATEGIES, Plan, solve
from memprop.trace.fake import fake_mode_of
from memprop.trace.step import find_chain
from memprop.units import parse_size
from memprop.workload import Workload, restore_state, save_state

__all__ = ["chain_of", "plan"]


def plan(
    model: nn.Module | Workload,
    inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    budget: int | str | None = None,
    strategy: str = "optimal",
    cost_model: str = "measured",
    *,
    loss_fn: Any = None,
    targets: torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    fake: bool = False,
) -> Plan:
    """The plan of ``strategy`` that keeps the training step of ``model(*inputs)`` under
    ``budget`` (bytes, or a size such as ``"2GiB"``) at the least extra compute.

    One training step is traced to find the chain's costs. With ``cost_model="measured"`` it is a
    real step, after which parameters, buffers, gradients and optimizer state are put back;
    with ``fake=True`` (or a model built in a fake-tensor mode) nothing is allocated and stages
    are priced in FLOPs, so ``cost_model`` must be ``"flops"``. Raises
    :class:`memprop.BudgetInfeasibleError` when nothing fits, :class:`memprop.errors.UsageError`
    for a model that is not a chain or a bad argument.
    """
    workload = as_planning_workload(model, inputs, loss_fn, targets, optimizer)
    budget_bytes = _budget(budget)
    if strategy not in STRATEGIES:
        raise UsageError(
            f"strategy {strategy!r} does not exist: use one of {', '.join(STRATEGIES)}"
        )
    if cost_model not in COST_MODELS:
        raise UsageError(f"cost model {cost_model!r} does not exist: use 'measured' or 'flops'")
    fake = fake or fake_mode_of(workload) is not None
    if fake and cost_model == "measured":
        raise UsageError(
            "cost_model='measured' was asked on fake tensors, which have no timings: "
            "use cost_model='flops' with fake=True, or plan on real tensors"
        )
    chain = chain_of(workload, cost_model=cost_model, fake=fake)
    return solve(chain, budget_bytes, strategy)


def chain_of(workload: Workload, *, cost_model: str, fake: bool) -> Chain:
    """The calibrated chain of one traced training step of ``workload``."""
    from memprop.trace.profile import trace_chain

    if find_chain(workload.model) is None:
        raise UsageError(not_a_chain(workload.model))
    context = contextlib.nullcontext() if fake else _restored(workload)
    with context:
        costs = trace_chain(workload, fake=fake)
    if costs is None:
        raise UsageError(
            f"{type(workload.model).__name__}: the traced step ran no stage of its chain: make "
            "the model's forward call its nn.Sequential of stages"
        )
    return Chain.from_chain_costs(costs, cost_model="flops" if cost_model == "flops" else
                                  "measured")


def not_a_chain(model: nn.Module) -> str:
    return (
        f"memprop plans chains, and {type(model).__name__} is not one: no nn.Sequential of "
        "stages was found (the model itself, the child named by model.memprop_chain, or its "
        "only nn.Sequential child): put the layers in an nn.Sequential or set "
        "model.memprop_chain = '<name of the nn.Sequential>'"
    )


def as_planning_workload(
    model: nn.Module | Workload,
    inputs: torch.Tensor | tuple[torch.Tensor, ...] | None,
    loss_fn: Any,
    targets: torch.Tensor | None,
    optimizer: torch.optim.Optimizer | None,
) -> Workload:
    if isinstance(model, Workload):
        if inputs is not None or loss_fn is not None or targets is not None or optimizer:
            raise UsageError("a Workload carries its own inputs, loss, targets and optimizer: "
                             "pass the Workload alone, or a model and its inputs")
        return model
    if not isinstance(model, nn.Module):
        raise UsageError(f"model is a {type(model).__name__}: give an nn.Module or a Workload")
    if inputs is None:
        raise UsageError("inputs are missing: give a tensor or a tuple of tensors for "
                         "model(*inputs)")
    batch = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return Workload(model=model, inputs=batch, targets=targets, loss_fn=loss_fn,
                    optimizer=optimizer, name=type(model).__name__,
                    batch_size=batch[0].shape[0] if batch and batch[0].dim() else None)


def _budget(budget: int | str | None) -> int:
    if budget is None:
        raise UsageError("budget is missing: give a cap on the training peak, in bytes or as a "
                         "size such as '2GiB'")
    return parse_size(budget)


@contextlib.contextmanager
def _restored(workload: Workload) -> Iterator[None]:
    """Put parameters, buffers, gradients, the optimizer's state and the random generators back
    as they were after a real traced step: planning must not train the caller's model. (A copy
    of the model would not do: a loss function may hold the model itself, as the seed's weight
    decay does.)"""
    state = save_state(workload)
    try:
        yield
    finally:
        restore_state(workload, state)
