"""The one step runner (``memprop.loop.training_step``) and the typed stages
(``memprop.trace.stages.StageRef``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from memprop.loop import training_step, zero_gradients
from memprop.trace.stages import PREFIX, SUFFIX, StageRef
from memprop.trace.step import trace_training_step
from memprop.workload import Workload


def _workload(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Workload(model=model, inputs=(torch.randn(4, 5),), optimizer=optimizer)


def test_the_phases_are_announced_where_torch_runs_them() -> None:
    """Oracle: torch's own hooks (a forward hook, a backward hook, the optimizer's step hook)
    interleaved with the runner's phase marks, in the loop's order."""
    workload = _workload()
    events: list[str] = []
    workload.model.register_forward_hook(lambda *_: events.append("forward ran"))
    workload.model.register_full_backward_hook(lambda *_: events.append("backward ran"))
    assert workload.optimizer is not None
    workload.optimizer.register_step_post_hook(lambda *_: events.append("step ran"))
    note = training_step(workload, on_phase=lambda phase: events.append(phase))
    assert events == ["forward", "forward ran", "backward", "backward ran", "optimizer",
                      "step ran", "end"]
    assert "mean" in note  # no loss function: the output's mean, said


def test_the_traced_step_is_the_plain_step() -> None:
    """Oracle: the loop written out by hand (zero_grad, forward, mean, backward, step) on an
    identical copy; the traced and the untraced runner leave the same parameters, to the bit."""
    traced, untraced, by_hand = _workload(), _workload(), _workload()
    for _ in range(2):  # the second step runs with the momentum made by the first
        zero_gradients(traced)
        trace_training_step(traced)
        zero_gradients(untraced)
        training_step(untraced)
        assert by_hand.optimizer is not None
        by_hand.optimizer.zero_grad(set_to_none=True)
        by_hand.model(*by_hand.inputs).float().mean().backward()
        by_hand.optimizer.step()
    for workload in (traced, untraced):
        for mine, theirs in zip(workload.model.parameters(), by_hand.model.parameters(),
                                strict=True):
            assert torch.equal(mine, theirs)


def test_gradients_kept_between_steps_accumulate_as_the_loop_says() -> None:
    """Oracle: with ``set_to_none=False`` and no optimizer, two steps leave twice one step's
    gradient (zero_grad zeroes in place, so the runner's zeroing must come from the caller)."""
    workload = _workload()
    workload.optimizer, workload.set_to_none = None, False
    reference = copy.deepcopy(workload)
    training_step(reference)
    training_step(workload)
    training_step(workload)
    for mine, once in zip(workload.model.parameters(), reference.model.parameters(),
                          strict=True):
        assert mine.grad is not None and once.grad is not None
        torch.testing.assert_close(mine.grad, 2 * once.grad)


@pytest.mark.parametrize(("name", "kind", "module"), [
    (PREFIX, "prefix", ""), (SUFFIX, "suffix", ""), ("transformer.h.3", "block", "transformer.h.3"),
])
def test_a_stage_name_decodes_to_its_kind_and_back(name: str, kind: str, module: str) -> None:
    """Oracle: the names plans and JSON carry, ``(prefix)``, ``(suffix)`` and module paths."""
    stage = StageRef.named(name)
    assert (stage.kind, stage.module, stage.is_block) == (kind, module, kind == "block")
    assert stage.name == name
