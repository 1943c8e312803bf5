"""The generators' state that ``torch.utils.checkpoint`` stashes for a re-run
(``preserve_rng_state``): kept only by checkpoints around blocks that draw random numbers, so a
plan of blocks without dropout is counted by the allocator to the byte, and gradients of blocks
with dropout stay those of the unplanned step, bit for bit."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import memprop
from memprop.plan.api import chain_of
from memprop.plan.chain import rng_state_bytes_on
from memprop.plan.schedule import Segment, simulate
from memprop.plan.solvers import Plan
from memprop.run.install import installed
from memprop.run.measure import run_plan
from memprop.workload import SeedConfig, Workload, seed_workload, to_workload
from memprop.zoo import GPT, next_token_loss

WIDTH = 32


class _Block(nn.Module):
    """A residual MLP block, with dropout or without."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, 2 * WIDTH)
        self.out = nn.Linear(2 * WIDTH, WIDTH)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.out(torch.relu(self.fc(x))))


DRAWS = (True, False, False, True, False, True)
"""Which blocks have dropout."""


def _mixed() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(*(_Block(0.25 if d else 0.0) for d in DRAWS))
    return to_workload(model, torch.randn(64, WIDTH))


def _checkpoints(tree: Segment) -> Iterator[Segment]:
    for child in tree.children:
        if isinstance(child, Segment):
            yield child
            yield from _checkpoints(child)


def _tightest(workload: Workload) -> Plan:
    loose = memprop.plan(workload, budget="1TiB", cost_model="flops", fake=True)
    return memprop.plan(workload, budget=loose.min_feasible_bytes, cost_model="flops", fake=True)


def test_the_plan_says_which_blocks_draw_random_numbers() -> None:
    plan = _tightest(_mixed())
    assert plan.draws_random == DRAWS


def test_only_checkpoints_around_random_blocks_keep_the_generators_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.get_rng_state`` is called by a checkpoint that keeps the state: once at its first
    run (the stash) and once at its re-run (``fork_rng``'s copy of the state to put back)."""
    workload = _mixed()
    plan = _tightest(workload)
    around_random = [s for s in _checkpoints(plan.tree) if any(DRAWS[s.start:s.stop])]
    around_none = [s for s in _checkpoints(plan.tree) if not any(DRAWS[s.start:s.stop])]
    assert around_random and around_none  # the plan tells the two apart
    calls = 0
    original = torch.get_rng_state

    def counted() -> Any:
        nonlocal calls
        calls += 1
        return original()

    with installed(workload.model, plan.stage_names, plan.tree, plan.selective,
                   plan.draws_random):
        output = workload.model(*workload.inputs)
        monkeypatch.setattr(torch, "get_rng_state", counted)
        calls = 0
        output = workload.model(*workload.inputs)
        output.float().mean().backward()
    assert calls == 2 * len(around_random)


def test_gradients_through_random_blocks_are_those_of_the_unplanned_step() -> None:
    workload = _mixed()
    plan = _tightest(workload)
    assert any(plan.forward_runs[i] > 1 for i, d in enumerate(DRAWS) if d)  # dropout re-runs
    result = run_plan(workload, plan, steps=2)
    assert result.gradients_match is True


def test_a_plan_of_blocks_without_random_ops_is_counted_to_the_byte() -> None:
    """The seed MLP draws nothing: its checkpoints keep no generator state, and the allocator
    counts the planned step at the plan's prediction exactly (it counted 5,056 bytes more per
    live checkpoint when every checkpoint kept the state)."""
    workload = seed_workload(SeedConfig(input_dim=64, hidden=128, depth=6, batch=256,
                                        optimizer="momentum"))
    loose = memprop.plan(workload, budget="1TiB", cost_model="flops", fake=True)
    plan = memprop.plan(workload, budget=(loose.min_feasible_bytes
                                          + loose.baseline_peak_bytes) // 2,
                        cost_model="flops", fake=True)
    assert not any(plan.draws_random) and any(_checkpoints(plan.tree))
    result = run_plan(workload, plan, steps=1)
    assert result.allocator_step_peaks_bytes[-1] == plan.peak_bytes
    assert result.step_peaks_bytes[-1] == plan.peak_bytes
    assert result.gradients_match is True


def test_a_plan_of_dropout_blocks_counts_their_states_to_the_byte() -> None:
    """memprop.zoo's GPT-2-shaped decoder with dropout, planned halfway between its least
    feasible peak and its unplanned one: its checkpoints keep the CPU generator's state, which
    the plan counts (it would predict less without them), and the allocator's count of the
    planned step is the prediction exactly, as is the ledger's, which now sees the states (it
    was one state below per checkpoint live at the peak, and the plan with it)."""
    torch.manual_seed(0)
    model = GPT(layers=4, width=64, heads=4, vocab=256, positions=32, dropout=0.1)
    ids = torch.randint(0, 256, (4, 32))
    workload = to_workload(model, ids, loss_fn=next_token_loss, targets=ids)
    loose = memprop.plan(workload, budget="1TiB", cost_model="flops", fake=True)
    plan = memprop.plan(workload, budget=(loose.min_feasible_bytes
                                          + loose.baseline_peak_bytes) // 2,
                        cost_model="flops", fake=True)
    assert any(any(plan.draws_random[s.start:s.stop]) for s in _checkpoints(plan.tree))
    chain = chain_of(workload, cost_model="flops", fake=True)
    assert chain.rng_state_bytes == rng_state_bytes_on("cpu") > 0
    without = simulate(dataclasses.replace(chain, rng_state_bytes=0), plan.tree).peak_bytes
    assert plan.peak_bytes > without  # states live at the peak
    result = run_plan(workload, plan, steps=1)
    assert result.allocator_step_peaks_bytes[-1] == plan.peak_bytes
    assert result.step_peaks_bytes[-1] == plan.peak_bytes
    assert result.gradients_match is True
