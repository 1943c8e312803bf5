"""The executor (memprop.run.install) runs a plan's schedule form: the forwards and backwards
torch performs under an installed plan, logged by the blocks themselves, are the schedule's
``Run`` and ``Backward`` actions in order (memprop.plan.actions), re-runs included."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from memprop.plan.actions import Backward, Run, actions_of
from memprop.plan.schedule import Segment
from memprop.plan.selective import Option
from memprop.run.install import installed
from tests.unit.test_plan_optimal import _plans

Log = list[tuple[str, int]]


class _Mark(torch.autograd.Function):
    """Identity whose backward logs that block ``index``'s backward is over (it sits at the
    block's input, so its gradient is the block's last)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: int, log: Log) -> torch.Tensor:
        ctx.index, ctx.log = index, log
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.log.append(("backward", ctx.index))
        return grad, None, None


class _Block(nn.Module):
    def __init__(self, index: int, log: Log) -> None:
        super().__init__()
        self.index, self.log = index, log
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(("forward", self.index))
        return torch.tanh(self.linear(_Mark.apply(x, self.index, self.log)))


def _executed(tree: Segment, selective: dict[int, Option] | None = None) -> Log:
    torch.manual_seed(0)
    log: Log = []
    n = tree.stop
    model = nn.Sequential(*(_Block(i, log) for i in range(n)))
    x = torch.randn(3, 4, requires_grad=True)
    with installed(model, [str(i) for i in range(n)], tree, selective, [False] * n):
        output = model(x)
        output.sum().backward()
    return log


def _scheduled(tree: Segment) -> Log:
    return [("forward", a.stage) if isinstance(a, Run) else ("backward", a.stage)
            for a in actions_of(tree) if isinstance(a, (Run, Backward))]


TREES = [Segment(start=0, stop=4, children=c) for c in _plans([(i, i + 1) for i in range(4)], 0, 4)]


@pytest.mark.parametrize("tree", TREES, ids=[str(t.to_dict()["children"]) for t in TREES])
def test_the_executor_runs_the_schedule_forms_forwards_and_backwards(tree: Segment) -> None:
    """Oracle: torch's own execution, logged inside each block's forward and at its input's
    gradient, against the schedule form of every plan of a 4-block chain."""
    assert _executed(tree) == _scheduled(tree)


def test_a_nested_and_selective_plan_runs_as_its_schedule() -> None:
    """Oracle as above, for checkpoints nested two deep and a selective one-block checkpoint
    (which keeps the output of its matmul for its re-run)."""
    inner = Segment(start=1, stop=3, children=(1, 2))
    tree = Segment(start=0, stop=5, children=(
        Segment(start=0, stop=3, children=(0, inner)),
        Segment(start=3, stop=4, children=(3,), option=1), 4))
    option = Option(cache_bytes=48, saved_cost=1.0, rerun_peak_bytes=0,
                    keep=(("aten.addmm.default", 0),))
    assert _executed(tree, {3: option}) == _scheduled(tree)
