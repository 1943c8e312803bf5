"""Identical blocks traced once (memprop.trace.repeated): the oracle is the full fake trace of
the same workload, every block traced. The profile built from 2, 3 and 4 traced blocks must be
that trace's to the byte (every figure of its JSON, the timeline and the ledger of saved
tensors included; only the stages' measured times differ), and so must the planner's chain;
blocks that are not one block repeated must be traced in full."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memprop
from memprop.trace import repeated
from memprop.trace.profile import trace_chain
from memprop.trace.repeated import find_repeats, traced_in_full
from memprop.trace.stages import ChainCosts
from memprop.workload import SeedConfig, Workload, seed_workload
from tests.models import gpt2, llama

_TIMES = ("forward_s", "backward_s")


@pytest.fixture(autouse=True)
def _short_models_extended(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models of 7 blocks are extended here (memprop extends 12 or more, where it is faster
    than the full trace), so that the oracle's full traces stay fast."""
    monkeypatch.setattr(repeated, "SHORTEST", 6)


def _comparable(profile: memprop.Profile) -> dict[str, Any]:
    """The profile's JSON with its timeline, without what a trace measures in seconds and the
    notes (which say how it was traced)."""
    document = profile.to_dict(timeline=True)
    document["stages"] = [{k: v for k, v in s.items() if k not in _TIMES}
                          for s in document["stages"]]
    del document["notes"]
    return document


def _untimed(chain: ChainCosts) -> ChainCosts:
    return dataclasses.replace(chain, stages=tuple(
        dataclasses.replace(s, forward_s=0.0, backward_s=0.0) for s in chain.stages))


def _reused(profile: memprop.Profile) -> bool:
    return any("identical blocks" in note and "traced in full" not in note
               for note in profile.notes)


class ResidualBlock(nn.Module):
    """``x + W2 relu(W1 x)``, with a layer index (an attribute that moves with the block)."""

    def __init__(self, width: int, index: int, hidden: int | None = None) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden or 2 * width)
        self.down = nn.Linear(hidden or 2 * width, width)
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class ResidualMLP(nn.Module):
    def __init__(self, hidden: list[int], width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, i, h) for i, h in enumerate(hidden))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _residual(hidden: list[int]) -> Workload:
    torch.manual_seed(0)
    model = ResidualMLP(hidden)
    x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
    return Workload(model=model, inputs=(x,), targets=y, loss_fn=F.cross_entropy,
                    optimizer=torch.optim.AdamW(model.parameters()), name="residual")


class Alternating(ResidualBlock):
    """Blocks that look identical (same class, shapes, attributes but the index) and are not:
    odd ones do more work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return torch.tanh(y) * y if self.index % 2 else y


def _alternating() -> Workload:
    workload = _residual([32] * 7)
    model = workload.model
    model.blocks = nn.ModuleList(Alternating(16, i) for i in range(7))  # type: ignore[union-attr]
    return dataclasses.replace(workload, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "seed MLP": lambda: seed_workload(SeedConfig(input_dim=24, hidden=32, classes=5, depth=7,
                                                 batch=4, optimizer="adam")),
    "residual MLP": lambda: _residual([32] * 7),
    "Llama": lambda: llama(2, layers=7, width=32, tokens=16),
    "GPT-2": lambda: gpt2(2, layers=7, width=32, tokens=16),
}


@pytest.mark.parametrize("name", WORKLOADS)
def test_profile_from_a_few_blocks_is_the_full_fake_trace(name: str) -> None:
    """Oracle: the full fake trace. Every figure of the profile (peaks, totals, the peak's
    breakdown, saved tensors with their ids and ticks, stages, chain, timeline) equal."""
    reused = memprop.profile(WORKLOADS[name](), fake=True)
    with traced_in_full():
        full = memprop.profile(WORKLOADS[name](), fake=True)
    assert _reused(reused), reused.notes
    assert not _reused(full)
    assert reused.training_peak_bytes == full.training_peak_bytes
    assert reused.inference_peak_bytes == full.inference_peak_bytes
    assert _comparable(reused) == _comparable(full)
    # The notes too (a key/value cache's names its bytes at the full depth), but for the one
    # that says how the step was traced.
    assert reused.notes[:-1] == full.notes


@pytest.mark.parametrize("name", WORKLOADS)
def test_planner_chain_from_a_few_blocks_is_the_full_fake_trace(name: str) -> None:
    """Oracle: the chain of the full fake trace, every stage's statistics (op log included)
    and every figure around them; only measured seconds differ."""
    workload = WORKLOADS[name]()
    reused = trace_chain(workload, fake=True)
    with traced_in_full():
        full = trace_chain(workload, fake=True)
    assert len(reused.stages) == len(full.stages)
    assert _untimed(reused) == _untimed(full)


def test_blocks_of_different_widths_are_traced_in_full() -> None:
    """Blocks of different hidden widths are not one block repeated: nothing is reused, and the
    profile is the full trace's."""
    workload = _residual([8, 8, 16, 16, 24, 24, 32])
    assert find_repeats(workload.model) is None
    profile = memprop.profile(workload, fake=True)
    with traced_in_full():
        full = memprop.profile(workload, fake=True)
    assert not _reused(profile)
    assert _comparable(profile) == _comparable(full)


def test_blocks_that_only_look_identical_fall_back_to_the_full_trace() -> None:
    """Odd blocks do more work than even ones, which the shapes and attributes do not show: the
    check against the traced 4-block step fails, the note says the model was traced in full,
    and every figure is the full trace's."""
    workload = _alternating()
    assert find_repeats(workload.model) is not None
    profile = memprop.profile(workload, fake=True)
    with traced_in_full():
        full = memprop.profile(workload, fake=True)
    assert any(note.startswith("traced in full: 7 blocks of blocks look identical, but")
               for note in profile.notes), profile.notes
    assert _comparable(profile) == _comparable(full)
    chain = trace_chain(workload, fake=True)
    with traced_in_full():
        assert _untimed(chain) == _untimed(trace_chain(workload, fake=True))


def test_few_blocks_are_traced_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``SHORTEST`` blocks the full trace is the faster: nothing is extended, no note."""
    monkeypatch.setattr(repeated, "SHORTEST", 8)
    workload = _residual([32] * 7)
    assert find_repeats(workload.model) is None
    assert not any("identical" in note for note in memprop.profile(workload, fake=True).notes)


def test_a_compiled_model_is_traced_from_its_graphs_not_cut(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A compiled model's step is inductor's graphs, which have no blocks to cut: its fake
    profile says it was traced from the compiled graphs and says nothing of identical blocks
    (cutting it failed and said "traced in full" before)."""
    from memprop.trace.compiled import COMPILED_GRAPHS_NOTE

    monkeypatch.setattr(repeated, "SHORTEST", 6)
    workload = _residual([32] * 7)
    workload.model = torch.compile(workload.model)
    notes = memprop.profile(workload, fake=True).notes
    assert any(note.startswith(COMPILED_GRAPHS_NOTE) for note in notes), notes
    assert not any("identical" in note for note in notes), notes
