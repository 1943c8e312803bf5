"""How long the optimal planner takes against chain length."""

from __future__ import annotations

from memprop.bench.common import BenchReport
from memprop.plan.bench import solve_times
from memprop.plan.solvers import DEFAULT_MAX_UNITS

__all__ = ["planner_solve_times"]

GOALS_S = {100: 1.0, 1000: 30.0}


def planner_solve_times(lengths: tuple[int, ...] = (10, 30, 100, 200, 300, 1000)
                        ) -> BenchReport:
    rows = solve_times(lengths)
    summary = []
    for row in rows:
        goal = GOALS_S.get(row["stages"])
        if goal is not None:
            met = row["solve_s"] <= goal
            summary.append(
                f"- {row['stages']} stages planned in {row['solve_s']:.2f} s "
                f"(goal < {goal:g} s: {'met' if met else 'missed'})."
            )
    summary.append(
        "- Synthetic heterogeneous chains (seeded), budget a third of the way from the least "
        f"feasible peak to the unplanned peak; up to {DEFAULT_MAX_UNITS} stages the plan is "
        f"exact, above it consecutive stages are grouped into {DEFAULT_MAX_UNITS} units."
    )
    return BenchReport(
        name="planner-solve-times",
        title="Planning time against chain length (optimal)",
        summary=summary,
        columns=["stages", "solve_s", "cpu_s", "budget_bytes", "peak_bytes", "compute_overhead"],
        rows=rows,
    )
