"""Planning grows linearly with depth (NOTE [ Planning time linear in depth ] in
memprop.plan.solvers): counted in simulated forward runs and the least peak's units, never
timed."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memprop.plan import _dp, memory, min_feasible_bytes, simulate, solve
from memprop.plan.actions import Run
from memprop.plan.bench import synthetic_chain
from memprop.plan.schedule import Segment
from memprop.plan.solvers import EXACT_MAX_UNITS, compute_of
from tests.unit.test_plan_optimal import _plans, _random_chain


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6))
def test_counted_compute_is_the_simulated_compute(seed: int, n: int) -> None:
    chain = _random_chain(random.Random(seed), n)
    for children in _plans(chain.atoms(), 0, len(chain.atoms()), chain, top=True):
        tree = Segment(start=0, stop=n, children=children)
        assert compute_of(chain, tree) == pytest.approx(simulate(chain, tree).compute)


def test_a_deeply_nested_plan_is_counted_as_simulated() -> None:
    # Stage a kept, the rest checkpointed, nested all the way down: stage i runs i + 1 times.
    n = 200
    chain = synthetic_chain(n)
    inner = Segment(start=n - 1, stop=n, children=(n - 1,))
    for a in reversed(range(1, n - 1)):
        inner = Segment(start=a, stop=n, children=(a, inner))
    tree = Segment(start=0, stop=n, children=(0, inner))
    simulated = simulate(chain, tree)
    assert simulated.forward_runs == tuple(range(1, n + 1))
    assert compute_of(chain, tree) == pytest.approx(simulated.compute)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How many stage forward runs the memory model folds (the simulator's and the dynamic
    programs' units'), and the most units the least-peak program is given."""
    counts = {"runs": 0, "units": 0}
    run, min_peak = memory.Ledger._run, _dp.min_peak

    def counting_run(self: Any, action: Run) -> None:
        counts["runs"] += 1
        run(self, action)

    def counting_min_peak(units: _dp.Units) -> Any:
        counts["units"] = max(counts["units"], units.n)
        return min_peak(units)

    monkeypatch.setattr(memory.Ledger, "_run", counting_run)
    monkeypatch.setattr(_dp, "min_peak", counting_min_peak)
    yield counts


def _work(n: int, counts: dict[str, int]) -> int:
    chain = synthetic_chain(n)
    floor = min_feasible_bytes(chain)[0]
    flat_peak = simulate(chain, Segment(start=0, stop=n, children=tuple(range(n)))).peak_bytes
    counts["runs"] = 0
    for strategy in ("optimal", "uniform", "none"):
        solve(chain, floor + (flat_peak - floor) // 3, strategy, strict=False)
    return counts["runs"]


def test_planning_work_grows_linearly_with_depth(counted: dict[str, int]) -> None:
    short, long = _work(500, counted), _work(2000, counted)
    # Four times the stages: about four times the runs (the segment counts uniform tries grow
    # with the logarithm of the depth); every segment count for each of n stages was 16 times.
    assert long <= 6 * short
    assert counted["units"] <= EXACT_MAX_UNITS
