"""The Python API inside a training script: what it says about the model it is given, and what
a wrapped model does over many steps and shapes."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memprop
from memprop.errors import PlanCheckError, UsageError
from memprop.run import wrapper
from memprop.run.wrapper import MAX_PLANS


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(6)],
                         nn.Dropout(0.2), nn.Linear(64, 4))


def test_a_model_left_in_eval_is_traced_in_train_and_said_so() -> None:
    model = _mlp()
    x = torch.randn(32, 64)
    trained = memprop.profile(model, x)
    model.eval()
    result = memprop.profile(model, x)
    assert any("was in eval()" in note for note in result.notes)
    assert not model.training and not any(m.training for m in model.modules())  # put back
    # The dropout mask is saved as in a training loop.
    assert result.saved_activations_bytes == trained.saved_activations_bytes
    assert any(t.module == "6" for t in result.saved_tensors)


def test_targets_without_a_loss_function_are_refused() -> None:
    with pytest.raises(UsageError, match="targets were given without a loss_fn"):
        memprop.profile(_mlp(), torch.randn(4, 64), targets=torch.zeros(4, dtype=torch.long))
    with pytest.raises(UsageError, match="targets were given without a loss_fn"):
        memprop.plan(_mlp(), torch.randn(4, 64), budget="1MiB",
                     targets=torch.zeros(4, dtype=torch.long))


def test_api_errors_speak_of_arguments_not_flags() -> None:
    with pytest.raises(memprop.BudgetInfeasibleError) as info:
        memprop.plan(_mlp(), torch.randn(64, 64), budget=1024)
    assert "--" not in str(info.value) and "raise the budget" in str(info.value)
    with pytest.raises(UsageError) as usage:
        memprop.plan(_mlp(), torch.randn(4, 64), budget="1MiB", strategy="best")
    assert "--" not in str(usage.value)


def _wrapped(budget_fraction: float = 0.3) -> tuple[memprop.run.PlannedModule, torch.Tensor]:
    model, x = _mlp(), torch.randn(256, 64)
    generous = memprop.plan(model, x, budget="1GiB")
    least = generous.min_feasible_bytes
    budget = least + int(budget_fraction * (generous.baseline_peak_bytes - least))
    return memprop.checkpoint(model, x, budget=budget), x


def test_the_wrapped_model_pickles_and_trains_after_loading() -> None:
    wrapped, x = _wrapped()
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, memprop.run.PlannedModule)
    assert list(loaded.state_dict()) == list(wrapped.state_dict())
    torch.manual_seed(1)
    loaded(x).float().mean().backward()
    torch.manual_seed(1)
    wrapped(x).float().mean().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(loaded.parameters(),  # type: ignore[arg-type]
                                                          wrapped.parameters(), strict=True))
    assert pickle.loads(pickle.dumps(wrapped)).plans.keys() == wrapped.plans.keys()


def test_smaller_inputs_reuse_a_plan_and_the_cache_is_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped, x = _wrapped()
    made = []
    original = wrapper._Planner.__call__

    def counted(self: wrapper._Planner, model: nn.Module, inputs: tuple[object, ...]
                ) -> memprop.plan.api.Plan:  # type: ignore[name-defined]
        made.append(tuple(t.shape for t in inputs))  # type: ignore[attr-defined]
        return original(self, model, inputs)

    monkeypatch.setattr(wrapper._Planner, "__call__", counted)
    first = wrapped.plan_for(x)
    for batch in (200, 128, 17, 256):  # no larger than the planned batch: the plan is reused
        assert wrapped.plan_for(torch.randn(batch, 64)) is first
    assert made == []
    for batch in range(257, 257 + MAX_PLANS + 4):  # each larger than any before: a new plan
        wrapped.plan_for(torch.randn(batch, 64))
    assert len(made) == MAX_PLANS + 4
    assert len(wrapped.plans) == MAX_PLANS


def test_checkpoint_refuses_a_plan_the_forward_never_runs() -> None:
    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh())
                                          for _ in range(6)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    model, x = Looped(), torch.randn(256, 64)
    least = memprop.plan(model, x, budget="1GiB").min_feasible_bytes
    with pytest.raises(PlanCheckError, match="never called it"):
        memprop.checkpoint(model, x, budget=least)


def test_a_chain_that_holds_little_of_the_step_is_caught_before_it_runs() -> None:
    """A ViT-shaped model whose only nn.Sequential child is its one-layer head: the planner
    sees the head as the whole chain, and the planned step, traced, is far above the budget."""

    class HeadOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0,
                                                                   batch_first=True)
                                        for _ in range(4))
            self.head = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.head(x[:, 0])

    model, x = HeadOnly(), torch.randn(8, 16, 32)
    step = {"loss_fn": F.cross_entropy, "targets": torch.zeros(8, dtype=torch.long)}
    least = memprop.plan(model, x, budget="1GiB", **step).min_feasible_bytes
    with pytest.raises(PlanCheckError, match="over the budget"):
        memprop.checkpoint(model, x, budget=least, **step)
