"""How long the planner takes against chain length, for ``memprop bench``."""

from __future__ import annotations

import random
import time
from typing import Any

from memprop.plan.chain import Chain, Stage
from memprop.plan.schedule import flat, simulate
from memprop.plan.solvers import DEFAULT_MAX_UNITS, min_feasible_bytes, solve

__all__ = ["solve_times", "synthetic_chain"]

_MIB = 1024**2


def synthetic_chain(n: int, *, seed: int = 0) -> Chain:
    """A heterogeneous chain of ``n`` stages with sizes in MiB and costs in seconds, seeded."""
    rng = random.Random(seed)
    stages = []
    for i in range(n):
        out = rng.randint(1, 16) * _MIB
        saves_output = rng.random() < 0.4
        tape = rng.randint(0, 16) * _MIB
        stages.append(Stage(
            name=f"layers.{i}", forward_cost=rng.uniform(1e-3, 1e-2),
            backward_cost=rng.uniform(2e-3, 2e-2), input_bytes=0, output_bytes=out,
            saved_bytes=tape + (out if saves_output else 0), saves_input=rng.random() < 0.7,
            saves_output=saves_output, forward_peak_bytes=out + tape + rng.randint(0, 8) * _MIB,
            backward_peak_bytes=out + rng.randint(0, 16) * _MIB,
        ))
    return Chain(stages=tuple(stages), fixed_bytes=256 * _MIB)


def solve_times(lengths: tuple[int, ...] = (10, 30, 100, 200, 300, 1000),
                max_units: int = DEFAULT_MAX_UNITS) -> list[dict[str, Any]]:
    """Seconds to plan a synthetic chain of each length with ``optimal``, at a budget a third of
    the way from the least feasible peak to the unplanned peak: on the clock (``solve_s``) and
    of this process's CPU (``cpu_s``, which other work on the machine does not stretch as
    much). ``max_units``: the solver's (a chain longer is planned in that many groups)."""
    rows = []
    for n in lengths:
        chain = synthetic_chain(n)
        floor_bytes, _ = min_feasible_bytes(chain)
        baseline_bytes = simulate(chain, flat(n)).peak_bytes
        budget_bytes = floor_bytes + (baseline_bytes - floor_bytes) // 3
        start, cpu = time.perf_counter(), time.process_time()
        plan = solve(chain, budget_bytes, "optimal", max_units=max_units)
        rows.append({
            "stages": n, "solve_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu, "budget_bytes": budget_bytes,
            "peak_bytes": plan.peak_bytes, "compute_overhead": plan.compute_overhead,
        })
    return rows
