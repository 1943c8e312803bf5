"""A chain whose blocks receive a non-contiguous view of a storage born in the prefix (a ViT's
tokens, ``embed(x).flatten(2).transpose(1, 2)``): the planner's prediction of each plan against
the ledger's peak of that plan's step, traced on fake tensors."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from memprop.plan import Chain, Plan, Segment, simulate, solve
from memprop.plan.api import chain_of
from memprop.plan.schedule import flat
from memprop.run.verify import traced_plan_peak
from memprop.workload import Workload


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class _TinyViT(nn.Module):
    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, width, 4, 4)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # the blocks' input: a transposed view
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def _workload() -> Workload:
    torch.manual_seed(0)
    return Workload(model=_TinyViT(), inputs=(torch.randn(2, 3, 16, 16),), name="tiny-vit")


def _plans(chain: Chain) -> list[Plan]:
    """Every plan of one checkpointed block (each of its options) and the unplanned one."""
    base = solve(chain, simulate(chain, flat(len(chain))).peak_bytes, "optimal")
    trees = [flat(len(chain))]
    last = len(chain) - 1
    for i in range(1, last):
        for option in range(len(chain.stages[i].options) + 1):
            inner = Segment(start=i, stop=i + 1, children=(i,), option=option)
            children = (*range(i), inner, *range(i + 1, len(chain)))
            trees.append(Segment(start=0, stop=len(chain), children=children))
    plans = []
    for tree in trees:
        sim = simulate(chain, tree)
        selective = {c.start: o for c in tree.children if isinstance(c, Segment)
                     and (o := chain.option_of(c)) is not None}
        plans.append(dataclasses.replace(base, tree=tree, peak_bytes=sim.peak_bytes,
                                         forward_runs=sim.forward_runs, selective=selective))
    return plans


def test_each_plan_of_a_view_fed_chain_predicts_its_traced_peak() -> None:
    """Oracle: the ledger's peak of the planned step, traced on fake tensors with the plan
    installed as the runtime installs it, is the prediction, for the unplanned step and every
    checkpoint of one block under each of its selective options."""
    chain = chain_of(_workload(), cost_model="flops", fake=True)
    assert any(stage.options for stage in chain.stages)  # selective options exist to check
    for plan in _plans(chain):
        assert (plan.tree, traced_plan_peak(_workload(), plan)) == (plan.tree, plan.peak_bytes)
