"""memprop.checkpoint from several threads (NOTE [ Plans installed per thread ] in
memprop.run.install), checkpointed twice, and pickled with a loss pickle cannot take."""

from __future__ import annotations

import copy
import pickle
import threading
from typing import Any

import pytest
import torch
from torch import nn

import memprop
from memprop.errors import UsageError
from memprop.run.wrapper import PlannedModule


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(6)],
                         nn.Linear(32, 4))


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(model(x).sum(), list(model.parameters())))


def _in_threads(work: Any, count: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return errors


def test_one_wrapper_trains_in_several_threads_as_in_one() -> None:
    model = _net()
    batches = [torch.randn(256 + 64 * (i % 2), 32, generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    expected = [_grads(model, x) for x in batches]
    peak = memprop.profile(model, batches[0]).training_peak_bytes
    wrapped = memprop.checkpoint(model, batches[0], budget=int(peak * 0.9))
    got: dict[int, list[list[torch.Tensor]]] = {i: [] for i in range(4)}

    def work(i: int) -> None:
        for _ in range(10):  # two input shapes: the second is planned while others run
            got[i].append(_grads(wrapped, batches[i]))

    assert _in_threads(work, 4) == []
    for i in range(4):
        for grads in got[i]:
            assert all(torch.allclose(a, b, atol=1e-6)
                       for a, b in zip(expected[i], grads, strict=True))
    assert all("forward" not in vars(m) for m in model.modules())  # every shadow removed
    assert any(p.forward_runs != tuple([1] * len(p.forward_runs))
               for p in wrapped.plans.values())  # something was recomputed


def test_two_plans_of_one_model_run_in_two_threads_at_once() -> None:
    model, x = _net(), torch.randn(256, 32)
    expected = _grads(model, x)
    peak = memprop.profile(model, x).training_peak_bytes
    tight = memprop.checkpoint(model, x, budget=int(peak * 0.8))
    loose = memprop.checkpoint(model, x, budget=int(peak * 0.95))
    wrappers = [tight, loose]
    results: list[list[torch.Tensor]] = []

    def work(i: int) -> None:
        for _ in range(10):
            results.append(_grads(wrappers[i % 2], x))

    assert _in_threads(work, 4) == []
    assert len(results) == 40
    assert all(torch.allclose(a, b, atol=1e-6) for grads in results
               for a, b in zip(expected, grads, strict=True))


def test_a_checkpointed_model_checkpointed_again_is_planned_for_the_new_budget() -> None:
    model, x = _net(), torch.randn(512, 32)
    expected = _grads(model, x)
    peak = memprop.profile(model, x).training_peak_bytes
    for first, second in ((0.9, 0.8), (0.8, 0.9)):
        inner = memprop.checkpoint(model, x, budget=int(peak * first))
        outer = memprop.checkpoint(inner, x, budget=int(peak * second))
        assert outer.module is model
        got = _grads(outer, x)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, got, strict=True))
        (chosen,) = outer.plans.values()
        assert chosen.budget_bytes == int(peak * second)
        assert chosen.peak_bytes <= chosen.budget_bytes


def _module_level_loss(output: torch.Tensor) -> torch.Tensor:
    return output.pow(2).mean()


def _halfway(model: nn.Module, x: torch.Tensor, loss_fn: Any) -> int:
    """A budget halfway between the least that fits and the unplanned peak."""
    unplanned = memprop.plan(model, x, budget=1 << 40, loss_fn=loss_fn)
    return (unplanned.min_feasible_bytes + unplanned.baseline_peak_bytes) // 2


def test_a_wrapper_pickles_as_its_model_does_whatever_its_loss() -> None:
    model, x = _net(), torch.randn(256, 32)
    budget = _halfway(model, x, _module_level_loss)
    with_lambda = memprop.checkpoint(model, x, budget=budget,
                                     loss_fn=lambda out: out.pow(2).mean())
    loaded = pickle.loads(pickle.dumps(with_lambda))
    assert isinstance(loaded, PlannedModule) and list(loaded.plans) == list(with_lambda.plans)
    assert loaded(x).pow(2).mean().item() == pytest.approx(model(x).pow(2).mean().item())
    with pytest.raises(UsageError, match="pickled without its loss_fn"):
        loaded(torch.randn(264, 32))  # a new shape needs the loss to be planned
    assert copy.deepcopy(with_lambda)._planner.loss_fn is not None  # a copy keeps it
    copied = copy.deepcopy(with_lambda)
    copied(torch.randn(264, 32)).sum().backward()  # and plans new shapes with it
    named = memprop.checkpoint(_net(), x, budget=budget, loss_fn=_module_level_loss)
    again = pickle.loads(pickle.dumps(named))
    again(torch.randn(264, 32)).sum().backward()  # a picklable loss plans new shapes
    assert len(again.plans) == 2
