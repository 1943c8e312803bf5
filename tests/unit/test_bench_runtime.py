"""The runtime benchmark's quick mode on tiny models: the report's shape and its invariants
(never its timings, which belong to the machine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memprop.bench._runtime_workloads import QUICK_CASES
from memprop.bench.common import BenchReport
from memprop.bench.runtime import COLUMNS, runtime_curves, write_runtime_plot
from memprop.plan.chain import rng_state_bytes_on

STATE_BYTES = rng_state_bytes_on("cpu")


@pytest.fixture(scope="module")
def report() -> BenchReport:
    return runtime_curves(quick=True)


def test_every_model_has_every_curve(report: BenchReport) -> None:
    assert report.name == "runtime-curves"
    assert report.columns == COLUMNS
    for name in QUICK_CASES:
        rows = [r for r in report.rows if r["model"] == name]
        contenders = {r["contender"] for r in rows}
        assert {"none", "every block", "every 2nd block", "op-level SAC"} <= contenders
        # torch's checkpoint_sequential applies only where the blocks are one nn.Sequential.
        sequential = [r["setting"] for r in rows if r["contender"] == "checkpoint_sequential"]
        assert sequential == (["segments=2", "segments=4"] if name == "mlp" else [])
        plain = next(r for r in rows if r["contender"] == "none")
        every = _checkpoints(next(r for r in rows if r["contender"] == "every block"), 0)
        for row in rows:
            assert set(row) == set(COLUMNS)
            # Recomputation adds compute and never adds memory over keeping everything, but for
            # the generator's states that checkpoints keep (two at most per checkpoint: its own
            # and fork_rng's at its re-run), which tiny models' tapes may not outweigh.
            assert row["flops"] >= plain["flops"]
            states = 2 * STATE_BYTES * _checkpoints(row, every)
            assert row["peak_bytes"] <= plain["peak_bytes"] + states


def _checkpoints(row: dict[str, Any], blocks: int) -> int:
    """How many checkpoints a row's contender runs: as its setting says, else (a policy, a
    plan) at most one per block."""
    setting = str(row["setting"])
    if setting.startswith("segments="):  # checkpoint_sequential: all segments but the last
        return int(setting.removeprefix("segments=")) - 1
    if setting.endswith(" checkpoints"):
        return int(setting.removesuffix(" checkpoints"))
    return 0 if row["contender"].startswith("none") else blocks


def test_every_plan_run_by_the_executor_peaks_where_predicted(report: BenchReport) -> None:
    # The recipes (every block, every second one, torchtitan's op-level policy) and memprop's
    # plans all run on memprop's executor, and the chain model predicts each to the byte.
    predicted = [r for r in report.rows if r["contender"] not in ("checkpoint_sequential",)]
    assert len(predicted) >= 4 * len(QUICK_CASES)
    for row in predicted:
        assert row["predicted_peak_bytes"] == row["peak_bytes"], row


def test_every_peak_is_measured_by_the_allocator_too(report: BenchReport) -> None:
    """The oracle is the allocator's count, which shares nothing with the ledger: it never
    reads less than the ledger, and equal within 1% where nothing is recomputed. Every model
    has its unplanned row, so the check cannot pass on an empty table."""
    unplanned = {r["model"] for r in report.rows if r["contender"] == "none"}
    assert unplanned == set(QUICK_CASES)
    for row in report.rows:
        allocator = row["allocator_peak_bytes"]
        assert allocator is not None and allocator >= row["peak_bytes"], row
        if row["contender"] == "none":
            assert allocator - row["peak_bytes"] <= 0.01 * allocator, row


def test_optimal_points_stay_within_their_budgets(report: BenchReport) -> None:
    # Optimal points are made only for budgets at or above the least feasible peak, so every
    # one is a plan the planner calls feasible.
    planned = [r for r in report.rows if r["contender"].startswith("optimal")]
    assert planned
    for row in planned:
        assert row["predicted_peak_bytes"] <= row["budget_bytes"]
        assert row["peak_bytes"] <= row["budget_bytes"], row


def test_optimal_peaks_never_rise_as_the_budget_shrinks(report: BenchReport) -> None:
    for name in QUICK_CASES:
        rows = sorted((r for r in report.rows if r["model"] == name
                       and r["contender"] == "optimal"), key=lambda r: r["budget_bytes"])
        peaks = [r["peak_bytes"] for r in rows]
        assert peaks == sorted(peaks)


def test_recomputation_shows_in_the_flops(report: BenchReport) -> None:
    for row in report.rows:
        if row["contender"] in ("every block", "every 2nd block", "checkpoint_sequential"):
            assert row["flops_vs_unplanned"] > 1.0


def test_the_goals_are_stated(report: BenchReport) -> None:
    text = "\n".join(report.summary)
    for goal in ("- (a) ", "- (c) "):
        assert text.count(goal) == len(QUICK_CASES)
    assert text.count("- (b) ") >= 3 * len(QUICK_CASES)  # one per baseline
    for line in report.summary:
        if line.startswith(("- (a) ", "- (b) At", "- (c) ")):
            assert ": met" in line or ": missed" in line, line
    assert text.count("torch.compile: did not run: quick mode skips it.") == len(QUICK_CASES)


def test_files_and_plot(report: BenchReport, tmp_path: Path) -> None:
    written = report.write(tmp_path)
    assert {p.name for p in written} == {"runtime-curves.md", "runtime-curves.json"}
    document = json.loads((tmp_path / "runtime-curves.json").read_text())
    assert document["schema_version"] == 1 and len(document["rows"]) == len(report.rows)
    png = write_runtime_plot(report, tmp_path / "runtime-curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
