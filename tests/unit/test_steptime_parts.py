"""The step-time model's parts, each against a figure computed another way: the contention of
ranks stepping at once from hand-made timings, a pipeline action's cost from the critical path
of its schedule (checked against a longest path through the schedule's own dependency graph),
and the cached table of action costs refused when implausible."""

from __future__ import annotations

import functools

import pytest

from memprop.distribute.communication import _checked_actions, action_s, critical_actions
from memprop.distribute.pipeline import SCHEDULES, placement, program
from memprop.distribute.steptime import Calibration, together_of


def _calibration() -> Calibration:
    return Calibration(fixed_s=0.0, scale=1.0, optimizer_s=0.0, error=0.0, threads=1,
                       sizes=(8, 16))


def test_together_is_the_slowest_ranks_fastest_round_over_rank_0s_fastest_alone() -> None:
    # Rank 0 alone: 4 ms then 3 ms; at once, rank 0 4.5 and 5, rank 1 6 and 5.5 (ms).
    found = together_of(2, 16, [0.004, 0.003], [[0.005, 0.0045], [0.006, 0.0055]])
    assert found.alone_s == pytest.approx(0.003)
    assert found.together_s == pytest.approx(0.0055)
    assert found.factor == pytest.approx(0.0055 / 0.003)


def test_only_candidates_on_several_ranks_are_priced_at_the_measured_contention() -> None:
    import dataclasses

    measured = dataclasses.replace(_calibration(), together=together_of(
        2, 16, [0.002], [[0.003], [0.0025]]))
    assert measured.on_ranks(0.010, 1) == pytest.approx(0.010)
    assert measured.on_ranks(0.010, 2) == pytest.approx(0.015)
    assert _calibration().on_ranks(0.010, 2) == pytest.approx(0.010)  # nothing measured
    assert "1.50x one alone" in measured.describe()


def _longest_path(schedule: str, ranks: int, microbatches: int) -> int:
    """The critical path in actions of unit cost, free sends: the longest chain through the
    schedule's dependency graph (each action after the one before it on its rank, a forward
    after the previous stage's, a backward after its own forward and the next stage's
    backward), by memoised recursion rather than by running the ranks' clocks."""
    last = ranks * SCHEDULES[schedule] - 1
    before: dict[tuple[str, int, int], tuple[str, int, int] | None] = {}
    for rank in range(ranks):
        previous = None
        for action in program(schedule, rank, ranks, microbatches):
            if action.kind == "release":
                continue
            key = (action.kind, action.stage, action.microbatch)
            before[key] = previous
            previous = key

    @functools.cache
    def finish(key: tuple[str, int, int]) -> int:
        kind, stage, micro = key
        needs = [before[key]]
        if kind == "F" and stage > 0:
            needs.append(("F", stage - 1, micro))
        if kind == "B":
            needs.append(("F", stage, micro))
            if stage < last:
                needs.append(("B", stage + 1, micro))
        return 1 + max((finish(n) for n in needs if n is not None), default=0)

    return max(finish(key) for key in before)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("microbatches", [2, 4, 8])
def test_critical_actions_equal_the_longest_path_of_the_schedule(schedule: str,
                                                                 microbatches: int) -> None:
    assert critical_actions(schedule, 2, microbatches) == _longest_path(schedule, 2,
                                                                        microbatches)


def test_gpipe_and_1f1b_on_two_stages_take_two_actions_per_microbatch_and_two() -> None:
    # By hand: M forwards on the first stage, one more on the second, then the mirror image.
    for schedule in ("GPipe", "1F1B"):
        assert critical_actions(schedule, 2, 8) == 2 * (8 + 1)
    assert all(len(stages) == 2 for stages in placement("LoopedBFS", 2).values())


def test_an_action_costs_the_step_over_its_critical_path() -> None:
    # A GPipe step of 8 microbatches on 2 ranks timed at 9 ms: 18 actions on its path.
    assert action_s(0.009, critical_actions("GPipe", 2, 8)) == pytest.approx(0.0005)


def test_a_cached_action_table_is_refused_unless_complete_and_plausible() -> None:
    good = {name: 0.0003 for name in SCHEDULES}
    assert _checked_actions(good) == good
    with pytest.raises(ValueError):
        _checked_actions({"GPipe": 0.0003})
    with pytest.raises(ValueError):
        _checked_actions({**good, "GPipe": -1.0})
    with pytest.raises(ValueError):
        _checked_actions([0.0003])


def test_a_long_optimizer_step_does_not_stop_larger_microbatches_being_timed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hand-made timings: a microbatch's forward and backward of 25 ms per 32 samples and an
    optimizer's step of 77 ms, whatever the microbatch (a 6.3M-parameter AdamW). The
    optimizer's step does not grow with the microbatch, so the larger sizes fit the time given
    to a timed step and are timed, and the fit recovers the compute's slope exactly (the
    optimizer's step scaled with the roofline stopped the timing at the smallest, and one size
    fits a scale alone, which is not what the step does)."""
    from memprop.distribute import steptime

    def timed(factory: object, size: int) -> tuple[float, float, float]:
        return 0.025 * size / 32, 0.077, 0.0

    monkeypatch.setattr(steptime, "_timed_step", timed)
    found = steptime.calibrate(lambda m: None, [32, 64, 128, 256], roofline_s=lambda m: m * 1e-4,
                               peak_bytes=lambda m: 1, threads=1)
    assert found.sizes == (32, 128, 256)
    assert found.fixed_s == pytest.approx(0.0, abs=1e-12)
    assert found.scale == pytest.approx(0.025 / 32 / 1e-4)
    assert found.optimizer_s == pytest.approx(0.077)
