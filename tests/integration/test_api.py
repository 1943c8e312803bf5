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

    def counted(self: wrapper._Planner, model: nn.Module, inputs: tuple[object, ...],
                keywords: dict[str, object]) -> object:
        made.append(tuple(t.shape for t in inputs))  # type: ignore[attr-defined]
        return original(self, model, inputs, keywords)

    monkeypatch.setattr(wrapper._Planner, "__call__", counted)
    first = wrapped.plan_for(x)
    for batch in (200, 128, 17, 256):  # no larger than the planned batch: the plan is reused
        assert wrapped.plan_for(torch.randn(batch, 64)) is first
    assert made == []
    for batch in range(257, 257 + MAX_PLANS + 4):  # each larger than any before: a new plan
        wrapped.plan_for(torch.randn(batch, 64))
    assert len(made) == MAX_PLANS + 4
    assert len(wrapped.plans) == MAX_PLANS


class _Looped(nn.Module):
    """Blocks in a container that the forward calls one by one, as Hugging Face models do."""

    def __init__(self, skip_when_small: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.Tanh())
                                    for _ in range(6))
        self.skip_when_small = skip_when_small

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip_when_small and x.shape[0] < 64:
            return x.sum(dim=1, keepdim=True) * self.layers[0][0].bias[:1]
        for layer in self.layers:
            x = layer(x)
        return x


def _loop_peak(model: nn.Module, x: torch.Tensor, steps: int = 3) -> int:
    from memprop.trace.ledger import StorageLedger
    from memprop.trace.step import register_step_state
    from memprop.workload import Workload

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    peaks = []
    for _ in range(steps):
        optimizer.zero_grad()
        ledger = StorageLedger()
        register_step_state(ledger, Workload(model=model, inputs=(x,), optimizer=optimizer),
                            training=True)
        with ledger:
            output = model(x)
            output.float().mean().backward()
            optimizer.step()
            del output
        peaks.append(ledger.peak()[0])
    return max(peaks)


def test_blocks_called_in_a_loop_are_planned_in_place() -> None:
    model, x = _Looped(), torch.randn(256, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = memprop.plan(model, x, budget="1GiB", optimizer=optimizer)
    # The items of the ModuleList are Sequentials: their layers are the blocks (flattened).
    assert plan.stage_names == tuple(f"layers.{i}.{j}" for i in range(6) for j in range(2))
    wrapped = memprop.checkpoint(model, x, budget=plan.min_feasible_bytes, optimizer=optimizer)
    assert _loop_peak(wrapped, x) == wrapped.plan_for(x).peak_bytes <= plan.min_feasible_bytes


def test_a_plan_the_forward_does_not_run_is_an_error() -> None:
    model, x = _Looped(skip_when_small=True), torch.randn(256, 64)
    least = memprop.plan(model, x, budget="1GiB").min_feasible_bytes
    wrapped = memprop.checkpoint(model, x, budget=least)
    wrapped(x).float().mean().backward()  # the blocks run under the plan
    with pytest.raises(PlanCheckError, match="did not run"):
        wrapped(torch.randn(8, 64))  # the same plan (a smaller batch), but no block runs


def test_the_blocks_of_a_vit_shaped_model_are_found_past_its_head() -> None:
    """A ViT-shaped model whose only nn.Sequential is its head, its blocks in an
    nn.ModuleList: the blocks hold the activations, and they are the run planned."""

    class HeadOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
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
    plan = memprop.plan(model, x, budget="1GiB", **step)
    # The head reads a view of the last block's output (x[:, 0]): the same storage flows on.
    assert plan.stage_names == ("blocks.0", "blocks.1", "blocks.2", "blocks.3", "head.0",
                                "head.1", "head.2")
    memprop.checkpoint(model, x, budget=plan.min_feasible_bytes, **step)  # checked: it holds
