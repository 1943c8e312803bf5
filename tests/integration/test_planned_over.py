"""A planned step measured over its prediction is a warning at any size (issue 16): a miss
within the tolerance still means a budget set at the prediction would be broken."""

from __future__ import annotations

import dataclasses

import memprop
from memprop.run.measure import check_run, run_plan
from memprop.workload import SeedConfig, seed_workload


def test_a_planned_step_a_few_bytes_over_its_prediction_is_a_warning() -> None:
    workload = seed_workload(SeedConfig(input_dim=64, hidden=128, depth=6, batch=64,
                                        optimizer="momentum"))
    plan = memprop.plan(workload, budget="1TiB", cost_model="flops", fake=True)
    result = run_plan(workload, plan, steps=1)
    assert result.peak_bytes == plan.peak_bytes  # exact: nothing to say
    assert check_run(result) == (None, None)
    low = dataclasses.replace(plan, peak_bytes=plan.peak_bytes - 64)  # 64 B under: 0.00x%
    error, warning = check_run(dataclasses.replace(result, plan=low))
    assert error is None
    assert warning is not None and "64 B over the plan's prediction" in warning
