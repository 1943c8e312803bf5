"""One step of the user's training loop, as memprop runs it: zero the gradients as the loop does,
forward, loss, backward, and the optimizer's step.

Every traced, planned, measured or timed step in memprop goes through these functions, so that
they all run the same step. The loop they stand for is::

    for batch in data:
        optimizer.zero_grad(set_to_none=workload.set_to_none)
        loss = loss_fn(model(*inputs), targets)
        loss.backward()
        optimizer.step()

NOTE [ The steady state ]
From the second step of such a loop on, the optimizer's state (SGD's momentum, Adam's two
moments) exists before the step starts and is live through forward and backward; on the first
step it is created inside ``optimizer.step()``. How the loop zeroes gradients decides what else
is live when the forward starts: ``zero_grad(set_to_none=True)`` (torch's default) frees them, so
backward allocates them again; ``set_to_none=False`` (and gradient accumulation) keeps them,
as zeros, through the whole step. memprop's training peak is the steady-state step's
(:func:`memprop.trace.step.trace_training` runs the first step to reach it); the first step's
peak is reported beside it, and a budget must cover both.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from memprop.blame import user_code
from memprop.errors import ModelError
from memprop.workload import Workload

__all__ = ["accumulated_step", "compute_loss", "remade_optimizer", "state_signature",
           "tensors_in", "training_step", "zero_gradients"]


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tuple, list or dict, in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def zero_gradients(workload: Workload) -> None:
    """The gradients as the loop leaves them between steps: freed (``set_to_none=True``) or
    zeroed in place (``set_to_none=False``)."""
    with user_code("zero_grad"):
        if workload.optimizer is not None:
            workload.optimizer.zero_grad(set_to_none=workload.set_to_none)
        else:
            workload.model.zero_grad(set_to_none=workload.set_to_none)


def state_signature(workload: Workload) -> tuple[int, ...]:
    """Storage bytes of what the next step starts with besides the model and its inputs: the
    gradients the loop keeps (none with ``set_to_none``) and the optimizer's state. Two equal
    signatures mean two steps that start from the same memory."""
    sizes = [0 if p.grad is None or workload.set_to_none else p.grad.untyped_storage().nbytes()
             for p in workload.model.parameters()]
    if workload.optimizer is not None:
        sizes += [t.untyped_storage().nbytes()
                  for t in tensors_in(list(workload.optimizer.state.values()))]
    return tuple(sizes)


def compute_loss(workload: Workload, output: Any) -> tuple[torch.Tensor, str]:
    """The step's loss, and a sentence saying how it was obtained. A loss that cannot be
    differentiated is the workload's error, said with its cause."""
    if workload.loss_fn is not None:
        with user_code("the loss function"):
            if workload.targets is not None:
                loss = workload.loss_fn(output, workload.targets)
            else:
                loss = workload.loss_fn(output)
        note = "the workload's loss function"
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ModelError(f"the loss function returned {shape}: a loss is a tensor of one "
                             "element; reduce it (.mean(), .sum()) inside the loss function")
    elif isinstance(output, torch.Tensor) and output.dim() == 0:
        loss, note = output, "the model's scalar output"
    elif isinstance(getattr(output, "loss", None), torch.Tensor):
        loss, note = output.loss, "the model's output.loss (computed in its forward)"
    else:
        parts = [t.float().mean() for t in tensors_in(output) if t.requires_grad]
        if not parts:
            raise ModelError(_why_no_gradient(workload, output))
        loss = parts[0]
        for part in parts[1:]:
            loss = loss + part
        reduced = ("output.float().mean()" if isinstance(output, torch.Tensor) else
                   f"the sum of .float().mean() of the output's {len(parts)} tensors that "
                   "require grad" if len(parts) > 1 else
                   "the .float().mean() of the output's one tensor that requires grad")
        note = f"{reduced} (no loss function given; memory-wise the choice hardly matters)"
    if not loss.requires_grad:
        raise ModelError(_why_no_gradient(workload, output))
    return loss, note


def _why_no_gradient(workload: Workload, output: Any) -> str:
    """Why a step has nothing to differentiate, in one line that says what to do."""
    model = workload.model
    name = type(model).__name__
    parameters = list(model.parameters())
    if not torch.is_grad_enabled():
        return (f"{name} ran with gradients disabled (torch.no_grad() or inference_mode() "
                "around the call): a training step needs them on")
    if output is None:
        return f"{name}.forward returned None: return the output tensor(s)"
    if not parameters:
        return f"{name} has no parameters: there is nothing to train"
    if not any(p.requires_grad for p in parameters):
        return (f"every parameter of {name} is frozen (requires_grad=False): unfreeze the ones "
                "to train")
    outputs = list(tensors_in(output))
    if not outputs:
        return (f"{name} returned {type(output).__name__} with no tensor in it: return the "
                "output tensor(s)")
    integers = [t for t in outputs if not (t.is_floating_point() or t.is_complex())]
    if len(integers) == len(outputs):
        return (f"{name} returned {integers[0].dtype} tensors, which carry no gradient: return "
                "floating-point outputs (integer inputs must go through an embedding or a cast "
                "before the trained layers)")
    return (f"{name}'s output does not depend on any trainable parameter: is it detached "
            "(.detach(), .item(), .data), computed under torch.no_grad() inside forward, or "
            "computed only from frozen layers?")


def training_step(workload: Workload, *, create_graph: bool = False,
                  on_phase: Callable[[str], None] | None = None) -> str:
    """One training step: forward, loss, backward and the optimizer's step; the one place
    memprop runs them (traced, planned, measured, timed or on a rank). Returns how the loss was
    obtained (:func:`compute_loss`).

    The gradients are as the previous step left them (call :func:`zero_gradients` first, as
    the loop does, or :func:`accumulated_step`). The output and the loss stay held until the
    step ends, as in a training loop that keeps them for logging: the peaks of every path are
    the same step's. ``on_phase(name)`` is called as each phase begins: ``"forward"``,
    ``"backward"`` (the loss computed), ``"optimizer"`` (backward done; called with or without
    an optimizer) and ``"end"`` (the output and loss still held): where a tracer marks its
    ledger."""
    mark = on_phase if on_phase is not None else _unmarked
    mark("forward")
    output, loss, note = _forward_backward(workload, create_graph=create_graph, mark=mark)
    mark("optimizer")
    if workload.optimizer is not None:
        with user_code("the optimizer's step"):
            workload.optimizer.step()
    mark("end")
    del output, loss
    return note


def _unmarked(phase: str) -> None:
    """No tracer watches the step."""


def _forward_backward(workload: Workload, *, create_graph: bool = False,
                      mark: Callable[[str], None] = _unmarked) -> tuple[Any, torch.Tensor, str]:
    with user_code("the model's forward"):
        output = workload.forward()
    loss, note = compute_loss(workload, output)
    mark("backward")
    with user_code("the backward pass"):
        loss.backward(create_graph=create_graph)
    return output, loss, note


def accumulated_step(workload: Workload, microbatches: int = 1, *,
                     quiet: Callable[[], AbstractContextManager[Any]] | None = None,
                     passes: Callable[[], Any] | None = None) -> None:
    """One step of the loop with its gradients accumulated over ``microbatches`` forward and
    backward passes of ``workload``'s inputs: the gradients zeroed as the loop does
    (``set_to_none``), the passes (all but the last under ``quiet()``, DDP's ``no_sync``), then
    the optimizer's step, the last output and loss held through it (:func:`training_step`).
    ``passes`` replaces the passes where a runtime runs its microbatches itself (a pipeline's
    schedule). The step of every distributed rank, real or predicted."""
    zero_gradients(workload)
    if passes is not None:
        with user_code("the backward pass"):
            passes()
        if workload.optimizer is not None:
            with user_code("the optimizer's step"):
                workload.optimizer.step()
        return
    for _ in range(microbatches - 1):
        with quiet() if quiet is not None else contextlib.nullcontext():
            _forward_backward(workload)
    training_step(workload)


def remade_optimizer(workload: Workload, parameters: list[torch.nn.Parameter]
                     ) -> torch.optim.Optimizer | None:
    """The workload's optimizer, made again over ``parameters`` (one rank's stages, FSDP2's
    sharded ones) with the same hyperparameters, as far as its constructor takes them (AdamW's
    defaults carry one its constructor sets itself)."""
    optimizer = workload.optimizer
    if optimizer is None:
        return None
    accepted = inspect.signature(type(optimizer)).parameters
    return type(optimizer)(parameters, **{k: v for k, v in optimizer.defaults.items()
                                          if k in accepted})
