"""Fake tensors: trace any size without allocating it.

A ``FakeTensorMode`` gives every tensor its shape, dtype, device and storage size but no data, so
the ledger records the same storages, byte for byte, as on real tensors (the tests hold it to
that). Factories run inside the mode build fake models directly; a real model is mirrored into a
fake one that shares nothing with it, so the user's model is never touched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from memprop.workload import Workload

__all__ = ["device_of", "fake_mode_of", "new_fake_mode", "to_fake_workload"]


def new_fake_mode() -> FakeTensorMode:
    # Real tensors may meet fake ones inside a step (a constant a loss function holds);
    # FakeTensorMode then treats them as fake of the same shape instead of refusing.
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_mode_of(workload: Workload) -> FakeTensorMode | None:
    for tensor in (*workload.model.parameters(), *workload.inputs):
        if isinstance(tensor, FakeTensor):
            return tensor.fake_mode
    return None


def to_fake_workload(workload: Workload, mode: FakeTensorMode) -> Workload:
    """A fake mirror of a real workload: same structure, fake parameters, buffers and inputs.

    The optimizer is rebuilt with the same class and parameter groups, and its state, if it
    has any (a workload in mid-training), is mirrored too, so the mirror starts where the
    real workload stands. Gradients are not mirrored: every traced step starts from the loop's
    ``zero_grad`` (``memprop.loop``).
    """
    model = workload.model
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(
            mode.from_tensor(parameter.detach()), requires_grad=parameter.requires_grad
        )
    for buffer in model.buffers():
        memo[id(buffer)] = mode.from_tensor(buffer)
    fake_model = copy.deepcopy(model, memo)
    optimizer = None
    if workload.optimizer is not None:
        groups = []
        for group in workload.optimizer.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({**settings, "params": [memo[id(p)] for p in group["params"]]})
        optimizer = type(workload.optimizer)(groups)  # type: ignore[call-arg]
        for original, state in workload.optimizer.state.items():
            optimizer.state[memo[id(original)]] = {
                key: _fake_state(value, mode) for key, value in state.items()
            }
    return Workload(
        model=fake_model,
        inputs=tuple(mode.from_tensor(t) for t in workload.inputs),
        targets=None if workload.targets is None else mode.from_tensor(workload.targets),
        loss_fn=workload.loss_fn,
        optimizer=optimizer,
        name=workload.name,
        batch_size=workload.batch_size,
        depth=workload.depth,
        config=dict(workload.config),
        set_to_none=workload.set_to_none,
    )


def _fake_state(value: Any, mode: FakeTensorMode) -> Any:
    """An optimizer's state entry on fake tensors. A scalar (Adam's step counter) stays a
    constant that fake tensors can read, since the optimizer reads it (``step.item()``)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 0:
        number = value.item()  # read outside the mode: inside it, the tensor would be fake
        with mode:
            return torch.tensor(number, dtype=value.dtype, device=value.device)
    return mode.from_tensor(value)


def device_of(workload: Workload) -> torch.device:
    for tensor in (*workload.model.parameters(), *workload.inputs):
        return tensor.device
    return torch.device("cpu")
