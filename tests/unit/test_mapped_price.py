"""The roofline's price of what the head option changes (NOTE [ The head option ] in
``memprop.plan.chain``): storages the CPU maps fresh at each birth, and ops that touch a few
elements of a large tensor. Oracles: sizes computed by hand."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from memprop.calibration.rates import Rates
from memprop.plan.chain import Chain
from memprop.trace.ledger import StorageLedger
from memprop.trace.profile import trace_chain
from memprop.trace.stages import MAPPED_BYTES
from memprop.workload import Workload


def _moved(run: object) -> dict[str, int]:
    ledger = StorageLedger(log_ops=True)
    with ledger:
        run()  # type: ignore[operator]
    assert ledger.ops is not None
    return {str(o.func): o.moved for o in ledger.ops}


def test_indexed_reads_and_writes_move_the_elements_they_select() -> None:
    """``probs[rows, labels]`` read and written in place (the chunked loss's gradient) moves the
    selected elements (read and written) and the indices, not the 1,000-by-500 tensor; an
    ``_unsafe_view`` moves nothing. Bytes by hand: 8 float32 elements, two int64 indices of 8."""
    probs = torch.rand(1000, 500)
    rows, labels = torch.arange(8), torch.arange(8)

    def step() -> None:
        probs[rows, labels] -= 1
        torch.ops.aten._unsafe_view(probs, [500, 1000])

    moved = _moved(step)
    indices = 2 * 8 * 8
    assert moved["aten.index.Tensor"] == 2 * 8 * 4 + indices
    assert moved["aten.index_put_.default"] == 2 * 8 * 4 + indices
    assert moved["aten._unsafe_view.default"] == 0


def test_a_storage_at_the_mmap_threshold_is_priced_as_mapped_fresh() -> None:
    """A linear layer whose output is MAPPED_BYTES (glibc's largest mmap threshold): the
    stage's forward counts that output as mapped fresh, and the roofline charges it at the
    rate given, beyond the same stage priced without it (fake tensors: nothing allocated)."""
    rows = MAPPED_BYTES // (4 * 4096)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4096), nn.Linear(4096, 8))
    workload = Workload(model=model, inputs=(torch.randn(rows, 64),))
    costs = trace_chain(workload, fake=True)
    wide = next(s for s in costs.stages if s.name == "1")
    assert wide.forward_mapped_bytes == rows * 4096 * 4 == MAPPED_BYTES
    assert all(s.forward_mapped_bytes == 0 for s in costs.stages if s is not wide)
    rates = Rates(flops_per_s=1e11, bytes_per_s=1e10, op_s=0.0, selective_op_s=0.0,
                  source="by hand")
    plain = Chain.from_chain_costs(costs, cost_model="roofline", rates=rates)
    mapped = Chain.from_chain_costs(costs, cost_model="roofline", rates=rates,
                                    mapped_s_per_byte=1e-10)
    by_name = {s.name: s for s in plain.stages}
    for stage in mapped.stages:
        extra = 1e-10 * dataclasses.asdict(
            next(s for s in costs.stages if s.name == stage.name))["forward_mapped_bytes"]
        assert abs(stage.forward_cost - by_name[stage.name].forward_cost - extra) < 1e-12
