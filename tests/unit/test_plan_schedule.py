"""The simulator by hand, the schedule format, uniform against checkpoint_sequential."""

from __future__ import annotations

import random

import pytest

from memprop.plan import (
    Chain,
    Segment,
    Stage,
    min_feasible_bytes,
    schedule_ops,
    simulate,
    solve,
    uniform_tree,
)
from memprop.plan.bench import solve_times, synthetic_chain
from memprop.plan.schedule import flat


def _linear(name: str, out: int) -> Stage:
    # saves its input only; forward transient = its output; backward transient = input grad
    return Stage(name=name, forward_cost=1.0, backward_cost=2.0, input_bytes=out,
                 output_bytes=out, saved_bytes=0, saves_input=True, saves_output=False,
                 forward_peak_bytes=out, backward_peak_bytes=out)


def test_simulator_counts_by_hand() -> None:
    chain = Chain(stages=tuple(_linear(f"l{i}", 10) for i in range(3)), fixed_bytes=100)
    # No plan: x1, x2 held by their consumers, x3 by the caller; stage 2's backward holds those,
    # d3 and the d2 it makes: 5 * 10.
    assert simulate(chain, Segment(start=0, stop=3, children=(0, 1, 2))).peak_bytes == 150
    # Checkpoint stages 0-1: x2 (stage 2's input) and x3, then d3 and stage 2's d2: 40. The
    # recompute of stage 1 holds x3, d2, x1 and its output x2: 40 too.
    tree = Segment(start=0, stop=3, children=(Segment(start=0, stop=2, children=(0, 1)), 2))
    sim = simulate(chain, tree)
    assert sim.peak_bytes == 140
    assert sim.forward_runs == (2, 2, 1)
    assert sim.compute == 5 * 1.0 + 3 * 2.0


def test_gradients_loss_and_optimizer_by_hand() -> None:
    stages = tuple(
        Stage(name=f"l{i}", forward_cost=1.0, backward_cost=2.0, input_bytes=10, output_bytes=10,
              saved_bytes=0, saves_input=True, saves_output=False, forward_peak_bytes=10,
              backward_peak_bytes=10, gradient_bytes=7)
        for i in range(3)
    )
    chain = Chain(stages=stages, fixed_bytes=100, loss_peak_bytes=25, loss_residual_bytes=13)
    # End of forward: x1, x2, x3 = 30; the loss rises 25 over it: 155 (the peak).
    # Stage 2's backward: 30 + 13 (d3 and 3 more) + 10 = 53; stage 1's: x1, x3, d2, 3 left by
    # the loss, 7 of stage 2's gradients, + 10: 50; stage 0's: x3, d1, 3, 14, + 10: 47.
    flat_tree = Segment(start=0, stop=3, children=(0, 1, 2))
    assert simulate(chain, flat_tree).peak_bytes == 155
    with_optimizer = Chain(stages=stages, fixed_bytes=100, loss_peak_bytes=25,
                           loss_residual_bytes=13, optimizer_peak_bytes=171)
    sim = simulate(with_optimizer, flat_tree)
    assert (sim.peak_bytes, sim.chain_peak_bytes) == (171, 155)
    # Re-running stages 0-1 during the backward sees stage 2's gradients live: x3, d2, 3 left
    # by the loss, 7, then x1 and x2 and stage 1's output transient (10): 50 over fixed.
    tree = Segment(start=0, stop=3, children=(Segment(start=0, stop=2, children=(0, 1)), 2))
    assert simulate(chain, tree).chain_peak_bytes == 100 + max(10 + 10 + 25, 10 + 10 + 13 + 10,
                                                               10 + 10 + 3 + 7 + 10 + 10)


def test_shared_storage_counted_once() -> None:
    relu = Stage(name="relu", forward_cost=1.0, backward_cost=1.0, input_bytes=8,
                 output_bytes=8, saved_bytes=8, saves_input=False, saves_output=True,
                 forward_peak_bytes=8, backward_peak_bytes=8)
    chain = Chain(stages=(_linear("l0", 8), relu, _linear("l2", 8)))
    # relu's saved output is l2's saved input: x2, counted once. x1 is freed once relu has run;
    # l2's backward holds x2, x3 (the caller's), d3 and the d2 it makes: 32 (double counting
    # x2 would give 40).
    assert simulate(chain, Segment(start=0, stop=3, children=(0, 1, 2))).peak_bytes == 8 * 4


def test_schedule_ops_in_execution_order() -> None:
    tree = Segment(start=0, stop=3, children=(Segment(start=0, stop=2, children=(0, 1)), 2))
    assert schedule_ops(tree) == [
        {"op": "forward", "stage": 0, "keep": "checkpoint", "run": 1},
        {"op": "forward", "stage": 1, "keep": "checkpoint", "run": 1},
        {"op": "forward", "stage": 2, "keep": "tape", "run": 1},
        {"op": "backward", "stage": 2},
        {"op": "forward", "stage": 0, "keep": "tape", "run": 2},
        {"op": "forward", "stage": 1, "keep": "tape", "run": 2},
        {"op": "backward", "stage": 1},
        {"op": "backward", "stage": 0},
    ]


def test_segments_must_partition() -> None:
    with pytest.raises(ValueError, match="partition"):
        Segment(start=0, stop=3, children=(0, 2))


@pytest.mark.parametrize(("n", "k"), [(7, 1), (7, 2), (7, 3), (8, 4), (5, 5)])
def test_uniform_is_checkpoint_sequential(n: int, k: int) -> None:
    # checkpoint_sequential: k-1 checkpointed segments of n // k stages, the rest run normally.
    tree = uniform_tree(n, k)
    size = n // k
    ckpts = [c for c in tree.children if isinstance(c, Segment)]
    assert [(c.start, c.stop) for c in ckpts] == [(i * size, (i + 1) * size) for i in range(k - 1)]
    assert [c for c in tree.children if isinstance(c, int)] == list(range(size * (k - 1), n))


def test_uniform_picks_the_cheapest_k_that_fits() -> None:
    chain = Chain(stages=tuple(_linear(f"l{i}", 10) for i in range(8)))
    budgets = sorted({simulate(chain, uniform_tree(8, k)).peak_bytes for k in range(1, 9)})
    for budget in budgets:
        plan = solve(chain, budget, "uniform")
        fitting = [simulate(chain, uniform_tree(8, k)) for k in range(1, 9)]
        assert plan.compute == min(s.compute for s in fitting if s.peak_bytes <= budget)


def test_plan_to_dict_matches_design() -> None:
    chain = synthetic_chain(6)
    plan = solve(chain, solve(chain, 10**12, "none").peak_bytes * 3 // 4, "optimal",
                 strict=False)
    doc = plan.to_dict()
    assert doc["schema_version"] == 1
    assert {"budget_bytes", "strategy", "cost_model", "feasible", "min_feasible_bytes", "stages",
            "schedule", "predicted", "baseline"} <= set(doc)
    assert set(doc["predicted"]) >= {"peak_bytes", "compute_overhead"}
    unplanned = simulate(chain, flat(len(chain))).compute
    assert doc["predicted"]["compute_overhead"] == pytest.approx(
        (simulate(chain, plan.tree).compute - unplanned) / unplanned, rel=1e-12)
    assert [s["recomputes"] for s in doc["stages"]] == [r - 1 for r in plan.forward_runs]


def test_predicted_peak_within_budget_on_10000_instances() -> None:
    rng = random.Random(11)
    checked = 0
    while checked < 10_000:
        n = rng.randint(1, 6)
        chain = Chain(stages=tuple(
            Stage(name=str(i), forward_cost=rng.random(), backward_cost=rng.random(),
                  input_bytes=0, output_bytes=rng.randint(1, 5000),
                  saved_bytes=rng.randint(0, 9000), saves_input=rng.random() < 0.7,
                  saves_output=False, forward_peak_bytes=rng.randint(0, 20000),
                  backward_peak_bytes=rng.randint(0, 20000),
                  gradient_bytes=rng.randint(0, 3000)) for i in range(n)),
            loss_peak_bytes=rng.randint(0, 9000), loss_residual_bytes=rng.randint(0, 9000))
        least = min_feasible_bytes(chain)[0]
        top = simulate(chain, flat(n)).peak_bytes
        for _ in range(20):
            budget = rng.randint(least, top)
            plan = solve(chain, budget, "optimal", max_slots=rng.choice((7, 50, 500)))
            assert simulate(chain, plan.tree).peak_bytes == plan.peak_bytes <= budget
            checked += 1


def test_solve_times_rows() -> None:
    rows = solve_times((5, 12))
    assert [r["stages"] for r in rows] == [5, 12]
    assert all(r["peak_bytes"] <= r["budget_bytes"] for r in rows)
