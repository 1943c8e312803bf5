"""The executor's call of torch's checkpoint generator (NOTE [ Checkpoint's generator ] in
memprop.run.install): its settings, named by memprop, against torch's own signature."""

from __future__ import annotations

import inspect

import torch
from torch.utils import checkpoint as torch_checkpoint

from memprop.run.install import _generator_settings, _open


def test_settings_are_the_generators_parameters_in_its_declared_order() -> None:
    """Oracle: the installed torch's signature of the generator, every parameter between the
    function and its ``*args``, in order: the positional call puts each setting where torch
    reads it."""
    parameters = list(inspect.signature(
        torch_checkpoint._checkpoint_without_reentrant_generator).parameters.values())
    declared = [p.name for p in parameters[1:] if p.kind is p.POSITIONAL_OR_KEYWORD]
    settings = _generator_settings(preserve_rng_state=False, context_fn=None)
    assert list(settings) == declared


def test_an_opened_span_recomputes_the_function_and_gives_torchs_gradient() -> None:
    """Oracle: autograd on the unwrapped function. A span opened by ``_open`` and closed after
    the function ran drops its tape and re-runs it in backward (two calls), and the input's
    gradient is the plain one, bit for bit."""
    calls = []

    def run(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return (x.sin() * x).sum()

    x = torch.linspace(-1.0, 1.0, 7, requires_grad=True)
    generator = _open(run, (x,), {}, preserve_rng_state=False)
    loss = run(x)
    for _ in generator:
        pass
    (grad,) = torch.autograd.grad(loss, x)
    plain = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad((plain.sin() * plain).sum(), plain)
    assert len(calls) == 2
    assert torch.equal(grad, expected)
