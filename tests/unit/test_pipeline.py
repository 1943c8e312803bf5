"""The pipeline's pieces against oracles: the split DP against every split, the simulated step
against the bubble formula, the schedules' orders against their definitions."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest

from memprop.distribute.pipeline import (
    SCHEDULES,
    PipelineShape,
    all_splits,
    placement,
    program,
    simulated_seconds,
    split_points,
)


def _slowest(costs: Sequence[float], bounds: tuple[int, ...]) -> float:
    return max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))


def test_split_points_minimise_the_slowest_stage() -> None:
    rng = random.Random(0)
    for _ in range(200):
        items = rng.randint(2, 9)
        stages = rng.randint(1, items)
        costs = [rng.uniform(0.1, 5.0) for _ in range(items)]
        best = min(_slowest(costs, b) for b in all_splits(items, stages))
        found = split_points(costs, stages)
        assert len(found) == stages + 1 and found[0] == 0 and found[-1] == items
        assert all(a < b for a, b in itertools.pairwise(found))
        assert _slowest(costs, found) == pytest.approx(best)


@pytest.mark.parametrize("ranks,microbatches", [(2, 4), (4, 4), (4, 8), (3, 5)])
def test_gpipe_and_1f1b_take_the_bubble_formula_with_free_sends(ranks: int,
                                                                microbatches: int) -> None:
    # Equal stages, sends free: (M + P - 1) (f + b) for both (1F1B saves memory, not time).
    f, b = 1.0, 2.0
    for schedule in ("GPipe", "1F1B"):
        shape = PipelineShape(schedule=schedule, ranks=ranks, microbatches=microbatches,
                              bounds=tuple(range(ranks + 1)))
        seconds = simulated_seconds(shape, [f] * ranks, [b] * ranks, lambda _: 0.0,
                                    [0] * (ranks + 1))
        assert seconds == pytest.approx((microbatches + ranks - 1) * (f + b))


def test_sends_add_to_the_critical_path() -> None:
    shape = PipelineShape(schedule="GPipe", ranks=2, microbatches=1, bounds=(0, 1, 2))
    # One microbatch: F0, send, F1, B1, send, B0.
    assert simulated_seconds(shape, [1.0, 1.0], [2.0, 2.0], lambda n: n / 100,
                             [0, 50, 0]) == pytest.approx(1 + 0.5 + 1 + 2 + 0.5 + 2)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_every_rank_runs_each_of_its_stages_once_per_microbatch(schedule: str) -> None:
    ranks, microbatches = 2, 4
    for rank, stages in placement(schedule, ranks).items():
        actions = [a for a in program(schedule, rank, ranks, microbatches)
                   if a.kind != "release"]
        expected = {(kind, s, m) for kind in "FB" for s in stages for m in range(microbatches)}
        assert sorted((a.kind, a.stage, a.microbatch) for a in actions) == sorted(expected)
        # A microbatch's backward on a stage comes after its forward there.
        order = [(a.kind, a.stage, a.microbatch) for a in actions]
        assert all(order.index(("F", s, m)) < order.index(("B", s, m))
                   for s in stages for m in range(microbatches))


def test_1f1b_warms_up_with_a_forward_per_later_stage_and_one_more() -> None:
    # torch's Schedule1F1B: min(M, S - s) forwards before the first backward.
    for rank, expected in enumerate([4, 3, 2, 1]):
        actions = program("1F1B", rank, 4, 8)
        assert [a.kind for a in actions[:expected + 1]] == ["F"] * expected + ["B"]
