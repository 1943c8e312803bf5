"""The schedule form (memprop.plan.actions) written out by hand, the one memory model folding it,
and the depth to which ``optimal`` plans every stage on its own (no grouping)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from memprop.plan import _dp, solve, solvers
from memprop.plan.actions import (
    Backward,
    Checkpoint,
    Keep,
    Loss,
    Release,
    Rerun,
    RerunDone,
    Run,
    actions_of,
)
from memprop.plan.bench import synthetic_chain
from memprop.plan.memory import Ledger
from memprop.plan.schedule import Segment, flat, simulate
from tests.unit.test_plan_optimal import _random_chain


def test_a_nested_selective_plan_is_this_sequence_of_actions() -> None:
    """Oracle: the execution order of nested non-reentrant checkpoints, by hand. Stages 0-2
    checkpointed with 1-2 checkpointed again inside, stage 3 checkpointed alone keeping its
    option 2's op outputs, stage 4 kept."""
    inner = Segment(start=1, stop=3, children=(1, 2))
    tree = Segment(start=0, stop=5, children=(
        Segment(start=0, stop=3, children=(0, inner)),
        Segment(start=3, stop=4, children=(3,), option=2), 4))
    assert list(actions_of(tree)) == [
        Checkpoint(0, 3), Run(0, Keep.NOTHING), Run(1, Keep.NOTHING), Run(2, Keep.NOTHING),
        Checkpoint(3, 4), Run(3, Keep.SELECTED, 2),
        Run(4, Keep.TAPE),
        Loss(),
        Backward(4),
        Rerun(3, 4, 2), Run(3, Keep.TAPE, 2), RerunDone(3, 4), Backward(3), Release(3, 4),
        Rerun(0, 3), Run(0, Keep.TAPE), Checkpoint(1, 3), Run(1, Keep.NOTHING),
        Run(2, Keep.NOTHING), RerunDone(0, 3),
        Rerun(1, 3), Run(1, Keep.TAPE), Run(2, Keep.TAPE), RerunDone(1, 3),
        Backward(2), Backward(1), Release(1, 3),
        Backward(0), Release(0, 3),
    ]


@pytest.mark.parametrize("seed", range(20))
def test_every_action_holds_what_it_took_and_the_step_ends_with_gradients_only(seed: int
                                                                                ) -> None:
    """Oracle: conservation. Folding a whole schedule, every activation storage taken is let
    go (the model's input's flow by stage 0) but the model's output, which the caller holds;
    and what is left live is exactly the parameter
    gradients, the loss's residue less the output gradient freed by the last backward, and
    the model's output: nothing a plan chose survives it."""
    rng = random.Random(seed)
    chain = _random_chain(rng, rng.randint(1, 7))
    n = len(chain)
    for children in _some_plans(chain, rng):
        ledger = Ledger(chain)
        ledger.hold(0)
        ledger.fold(actions_of(Segment(start=0, stop=n, children=children)))
        held = [j for j in range(n + 1) if ledger.refs[j]]
        assert held == [chain.storage_of(n)]
        output = chain.storage_bytes(chain.storage_of(n))
        left = (chain.gradients_from(0) + chain.loss_left_bytes()
                - chain.freed_grad_bytes(n - 1) + output)
        assert ledger.live == left


def _some_plans(chain: Any, rng: random.Random) -> list[tuple[int | Segment, ...]]:
    from tests.unit.test_plan_optimal import _plans

    atoms = chain.atoms()
    plans = list(_plans(atoms, 0, len(atoms), chain, top=True))
    return rng.sample(plans, min(len(plans), 30))


@pytest.fixture
def table_units(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of units each cost table the planner builds is given."""
    seen: list[int] = []
    build = _dp.CostTable.__init__

    def counting(self: Any, units: _dp.Units, slots: int) -> None:
        seen.append(units.n)
        build(self, units, slots)

    monkeypatch.setattr(_dp.CostTable, "__init__", counting)
    return seen


def test_two_hundred_stages_are_planned_each_on_its_own(table_units: list[int]) -> None:
    """Oracle: the chain's own atoms. A 200-stage chain's cost table has a unit per atom (no
    grouping: the exact program), and the plan's note says nothing of groups."""
    chain = synthetic_chain(200)
    plan = solve(chain, _budget(chain), "optimal")
    assert table_units == [len(chain.atoms())] == [200]
    assert "group" not in plan.cost_note


def test_a_longer_chain_is_grouped_and_its_note_says_so(table_units: list[int]) -> None:
    """Oracle: the atoms against the exact program's reach. One stage more than it reaches
    is planned on that many groups, and the plan's note says how many."""
    n = solvers.DEFAULT_MAX_UNITS + 1
    chain = synthetic_chain(n)
    plan = solve(chain, _budget(chain), "optimal")
    assert table_units == [solvers.DEFAULT_MAX_UNITS] and len(chain.atoms()) == n
    assert f"its {n} stages planned as {solvers.DEFAULT_MAX_UNITS} groups" in plan.cost_note


def _budget(chain: Any) -> int:
    floor = solvers.min_feasible_bytes(chain)[0]
    return floor + (simulate(chain, flat(len(chain))).peak_bytes - floor) // 3
