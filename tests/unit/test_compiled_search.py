"""The compiled planner's search over its knobs (memprop.plan.compiled.plan_compiled), on
candidates whose peaks and prices are given by hand instead of compiled: the oracle is the
cheapest fitting candidate of the whole table, found by looking at every entry."""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import pytest

from memprop.errors import BudgetInfeasibleError
from memprop.plan.compiled import CompiledCandidate, CompiledProbes, plan_compiled

WORKLOAD = SimpleNamespace(name="hand-made")  # only its name is read: the probes are the table's
compiled = importlib.import_module("memprop.plan.compiled")  # memprop.plan is also a function

# At AMB 1.0: the model's own head, and the head option in 2, 4, 8 and 16 chunks. Fewer chunks
# hold more of the logits; here 4 chunks is the cheapest way under 650 bytes.
AT_FULL = {0: (1000, 1.00), 2: (700, 1.10), 4: (600, 1.05), 8: (550, 1.20), 16: (520, 1.30)}


def _candidate(amb: float, chunks: int) -> CompiledCandidate:
    peak, cost = AT_FULL[chunks]
    held = int(peak * (0.5 + amb / 2))  # recomputing more (lower AMB) holds less, costs more
    return CompiledCandidate(activation_memory_budget=amb, head_chunks=chunks,
                             predicted_peak_bytes=held, bound_peak_bytes=held,
                             saved_activations_bytes=0, cost=cost + (1 - amb))


class _Table(CompiledProbes):
    def get(self, workload: Any, amb: float, chunks: int) -> CompiledCandidate:
        key = (float(amb), int(chunks))
        self.found.setdefault(key, _candidate(*key))
        return self.found[key]


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> _Table:
    monkeypatch.setattr(compiled, "_head_chunk_counts", lambda workload: (2, 4, 8, 16))
    monkeypatch.setattr(compiled, "_floor_bytes", lambda workload: 0)
    return _Table()


def test_a_chunk_count_between_the_fewest_and_the_most_is_taken_when_it_is_cheapest(
        table: _Table) -> None:
    plan = plan_compiled(WORKLOAD, 650, chunk_head=True, probes=table)  # type: ignore[arg-type]
    fitting = [c for c in table.found.values() if c.bound_peak_bytes <= 650]
    best = min(fitting, key=lambda c: c.cost)
    assert (plan.head_chunks, plan.activation_memory_budget) == (4, 1.0)
    assert (best.head_chunks, best.activation_memory_budget) == (4, 1.0)
    # every count was looked at: the table's cheapest under 650 B overall is the same one
    every = [_candidate(1.0, c) for c in AT_FULL] + [
        _candidate(a / 32, c) for a in range(33) for c in AT_FULL]
    cheapest = min((c for c in every if c.bound_peak_bytes <= 650), key=lambda c: c.cost)
    assert cheapest.head_chunks == 4


def test_below_every_count_at_full_budget_the_most_chunks_are_bisected(table: _Table) -> None:
    plan = plan_compiled(WORKLOAD, 400, chunk_head=True, probes=table)  # type: ignore[arg-type]
    assert plan.head_chunks == 16 and plan.activation_memory_budget < 1.0
    assert plan.bound_peak_bytes <= 400
    with pytest.raises(BudgetInfeasibleError):
        plan_compiled(WORKLOAD, 200, chunk_head=True, probes=table)  # type: ignore[arg-type]
