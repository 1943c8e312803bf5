"""The exercise report's verdict on each candidate's predicted step, and the other work it
names, each against figures worked out by hand."""

from __future__ import annotations

import pytest

from memprop.bench.distribute import STEP_GOAL, CpuClock, other_cores, step_verdict


def test_a_step_within_the_goal_is_met_either_way() -> None:
    assert step_verdict(0.8, 1.0, 2, "DDP", 0.0, 2) == (True, f"within {STEP_GOAL:.0%}, "
                                                         "goal met")
    assert step_verdict(1.2, 1.0, 1, "one device", 1.5, 2)[0]


def test_a_miss_names_ranks_sharing_cores_before_other_work() -> None:
    met, why = step_verdict(0.5, 1.0, 4, "DDP", 1.0, 2)
    assert not met
    assert "ran slower than predicted" in why and "its 4 ranks shared 2 cores" in why


def test_a_miss_names_other_work_when_it_took_a_share_of_the_cores() -> None:
    met, why = step_verdict(0.5, 1.0, 2, "pipeline", 0.75, 2)
    assert not met and "other work took 0.75 of the 2 cores" in why


def test_a_miss_on_a_quiet_machine_names_the_part_of_the_model_its_family_adds() -> None:
    met, why = step_verdict(1.5, 1.0, 2, "pipeline", 0.0, 2)
    assert not met and "ran faster than predicted" in why
    assert "the model's error: the schedule's runtime" in why
    assert "calibration's fit" in step_verdict(0.5, 1.0, 1, "one device", 0.1, 2)[1]


def test_other_work_is_the_machines_busy_time_less_ours_over_the_wall_time() -> None:
    # 10 s of wall time; the machine busy 15 core-seconds, of which 5 were this process's.
    before = CpuClock(wall_s=100.0, busy_s=40.0, ours_s=4.0)
    after = CpuClock(wall_s=110.0, busy_s=55.0, ours_s=9.0)
    assert other_cores(before, after) == pytest.approx(1.0)
    assert other_cores(after, after) == 0.0
    assert other_cores(before, CpuClock(wall_s=110.0, busy_s=41.0, ours_s=9.0)) == 0.0
