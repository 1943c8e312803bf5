"""A forward whose sizes depend on values (a mixture of experts' routing: top-k, nonzero,
index_add) is planned: on real tensors where there are some (exact), on fake tensors with those
sizes at their worst case when fake is asked (an upper bound), and the plan says which (NOTE
[ Sizes that depend on values ] in memprop.trace.fake)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DynamicOutputShapeException
from typer.testing import CliRunner

import memprop
from memprop.trace.fake import exact_sizes_only, new_fake_mode, sized_at_worst
from memprop_cli.main import app

MOE = '''
import torch
from torch import nn


class MoE(nn.Module):
    def __init__(self, dim=16, experts=4, k=2):
        super().__init__()
        self.gate = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
            for _ in range(experts))
        self.k = k

    def forward(self, x):
        weights, chosen = self.gate(x).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            y = expert(x[rows]) * weights[rows, slot].unsqueeze(-1)
            out = out.index_add(0, rows, y)
        return x + out


def make(batch_size=32, depth=3):
    torch.manual_seed(0)
    return nn.Sequential(*[MoE() for _ in range(depth)], nn.Linear(16, 4)), \\
        torch.randn(batch_size, 16)
'''


@pytest.fixture
def moe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, torch.Tensor]:
    (tmp_path / "moe.py").write_text(MOE)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(MOE, str(tmp_path / "moe.py"), "exec"), namespace)
    return namespace["make"]()  # type: ignore[operator,no-any-return]


def test_fake_tensors_size_value_dependent_ops_at_their_worst_case() -> None:
    with sized_at_worst() as found, new_fake_mode():
        x = torch.randn(8, 4)
        shapes = [tuple(x.nonzero().shape), tuple((x > 0).nonzero(as_tuple=True)[0].shape),
                  tuple(x[x > 0].shape), tuple(torch.masked_select(x, x > 0).shape)]
    assert shapes == [(32, 2), (32,), (32,), (32,)]  # every element selected
    assert "aten.nonzero.default" in found and "aten.masked_select.default" in found
    with pytest.raises(DynamicOutputShapeException), exact_sizes_only(), new_fake_mode():
        torch.randn(8, 4).nonzero()


def test_a_mixture_of_experts_is_planned_on_real_tensors_exactly(
        moe: tuple[nn.Module, torch.Tensor]) -> None:
    model, inputs = moe
    traced = memprop.profile(model, inputs).training_peak_bytes
    before = [p.detach().clone() for p in model.parameters()]
    plan = memprop.plan(model, inputs, budget=traced - 1)
    assert plan.baseline_peak_bytes == traced and plan.peak_bytes < traced
    assert "traced on real tensors" in plan.cost_note
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_a_mixture_of_experts_on_fake_tensors_is_bounded_from_above(
        moe: tuple[nn.Module, torch.Tensor]) -> None:
    model, inputs = moe
    traced = memprop.profile(model, inputs).training_peak_bytes
    plan = memprop.plan(model, inputs, budget=1 << 30, fake=True)
    assert plan.baseline_peak_bytes > traced  # every token routed to every expert
    assert "worst case" in plan.cost_note and "nonzero" in plan.cost_note
    wrapped = memprop.checkpoint(model, inputs, budget=plan.min_feasible_bytes)
    wrapped(inputs).sum().backward()  # planned on fake tensors at the worst case, then run
    assert all(p.grad is not None for p in model.parameters())


def test_plan_on_the_command_line_says_how_it_traced(moe: tuple[nn.Module, torch.Tensor]) -> None:
    for flags, said, checked in (((), "traced on real tensors", "real"),
                                 (("--fake",), "worst case", "fake")):
        result = CliRunner().invoke(app, ["plan", "--model", "moe.py:make", "--batch", "32",
                                          "--budget", "1GiB", *flags, "--json", "-"])
        assert result.exit_code == 0, result.output
        assert said in json.loads(result.stdout)["cost_note"]
        assert f"checked: the planned step traced on {checked} tensors" in result.stderr


def test_a_fake_profile_says_its_sizes_were_taken_at_the_worst_case(
        moe: tuple[nn.Module, torch.Tensor]) -> None:
    model, inputs = moe
    real, fake = memprop.profile(model, inputs), memprop.profile(model, inputs, fake=True)
    assert fake.training_peak_bytes > real.training_peak_bytes
    assert any("worst case" in note for note in fake.notes)
    assert not any("worst case" in note for note in real.notes)
