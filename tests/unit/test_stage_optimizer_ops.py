"""The optimizer's step is no stage's backward (``memprop.trace.stages``): an optimizer that
updates the parameters in place (SGD's momentum: ``mul_``, ``add_``) makes no storage, so its
ops share the clock's last backward tick, and were counted in the first stage's backward (the
last one to run).

Oracle: the same step traced without an optimizer: every stage's backward statistics (FLOPs,
bytes moved, ops, pointwise calls) are the same with SGD's momentum."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from memprop.loop import training_step
from memprop.trace.step import trace_training, trace_training_step
from memprop.workload import Workload

_BACKWARD = ("backward_flops", "backward_moved_bytes", "backward_ops", "backward_pointwise",
             "backward_peak_bytes", "gradient_bytes")


def _stages(optimizer: bool) -> list[dict[str, object]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    sgd = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
           if optimizer else None)
    workload = Workload(model=model, inputs=(torch.randn(8, 16),), optimizer=sgd)
    training_step(workload)  # the momentum buffers exist from the first step on
    chain = trace_training_step(workload, log_ops=True).chain
    assert chain is not None
    return [{f: getattr(s, f) for f in _BACKWARD} | {"name": s.name} for s in chain.stages]


@pytest.mark.parametrize("field", _BACKWARD)
def test_sgds_in_place_updates_are_in_no_stages_backward(field: str) -> None:
    """Oracle: the step without an optimizer, stage by stage (the first stage's backward was
    the one that held SGD's ops)."""
    with_sgd, without = _stages(True), _stages(False)
    assert [s["name"] for s in with_sgd] == [s["name"] for s in without]
    assert [s[field] for s in with_sgd] == [s[field] for s in without]


def test_the_optimizers_ops_were_logged() -> None:
    """The oracle above is not vacuous: the traced step's op log holds SGD's in-place updates
    (one add_ per parameter at least), after the backward ended."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    workload = Workload(model=model, inputs=(torch.randn(2, 4),), optimizer=sgd)
    training_step(workload)
    trace = trace_training_step(workload, log_ops=True)
    assert trace.ledger.ops is not None
    late = [o for o in trace.ledger.ops if o.tick >= trace.backward_end
            and str(o.func) == "aten.add_.Tensor"]
    assert len(late) >= len(list(model.parameters()))


class _Residual(nn.Module):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.up, self.down, self.index = nn.Linear(16, 32), nn.Linear(32, 16), index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class _Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 16)
        self.blocks = nn.ModuleList(_Residual(i) for i in range(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_identical_blocks_extend_a_chain_whose_optimizer_updates_in_place(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The stages around the blocks are the same at every depth (memprop.trace.extend_chain
    holds them so, now that no stage's backward holds the optimizer's ops, which grew with the
    parameters): a 7-block chain under SGD with momentum (every update in place) is extended
    from 2, 3 and 4 blocks, and equals the full fake trace's (the oracle), times aside."""
    from memprop.trace import repeated
    from memprop.trace.fake import new_fake_mode, to_fake_workload
    from memprop.trace.repeated import trace_reusing_blocks, traced_in_full

    monkeypatch.setattr(repeated, "SHORTEST", 6)
    torch.manual_seed(0)
    model = _Deep()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    mode = new_fake_mode()
    workload = to_fake_workload(Workload(model=model, inputs=(torch.randn(8, 16),),
                                         optimizer=sgd), mode)

    def untimed(chain: object) -> list[object]:
        assert chain is not None
        return [dataclasses.replace(s, forward_s=0.0, backward_s=0.0)
                for s in chain.stages]  # type: ignore[attr-defined]

    with mode:
        reused = trace_reusing_blocks(workload, inference=False, log_ops=True, ledger=False)
        with traced_in_full():
            full = trace_training(workload, log_ops=True).steady.chain
    assert reused is not None and reused.training is not None, reused and reused.note
    assert untimed(reused.training.steady.chain) == untimed(full)
