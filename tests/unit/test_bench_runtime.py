"""The runtime benchmark's quick mode on tiny models: the report's shape and its invariants
(never its timings, which belong to the machine)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from memprop.bench import _runtime_hf as hf
from memprop.bench._runtime_hf_child import LARGEST
from memprop.bench._runtime_workloads import HF_GPT2, QUICK_CASES
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
            assert set(row) >= set(COLUMNS)
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
    predicted = [r for r in report.rows if r["contender"] not in ("checkpoint_sequential",)
                 and r["model"] in QUICK_CASES]
    assert len(predicted) >= 4 * len(QUICK_CASES)
    for row in predicted:
        assert row["predicted_peak_bytes"] == row["peak_bytes"], row


def test_every_peak_is_measured_by_the_allocator_too(report: BenchReport) -> None:
    """The oracle is the allocator's count, which shares nothing with the ledger: it never
    reads less than the ledger, and equal within 1% where nothing is recomputed. Every model
    has its unplanned row, so the check cannot pass on an empty table."""
    unplanned = {r["model"] for r in report.rows if r["contender"] == "none"}
    assert unplanned == {*QUICK_CASES, HF_GPT2}
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


def _hf_rows(report: BenchReport) -> list[dict[str, Any]]:
    return [r for r in report.rows if r["model"] == HF_GPT2]


def test_hf_gpt2_has_every_contender_with_the_allocators_peak(report: BenchReport) -> None:
    """Issue 18's contenders on Hugging Face's GPT-2, all in one child process: the eager step,
    HF's own checkpointing, torch.compile unplanned and under a lower activation_memory_budget,
    memprop's eager plan at 50% of the activations (the head option where the planner takes
    it) and the largest batch; each with the allocator's peak and an interleaved time."""
    rows = _hf_rows(report)
    contenders = {(r["contender"], r["setting"]) for r in rows}
    assert ("none", "eager, no checkpointing") in contenders
    assert ("HF checkpointing", "gradient_checkpointing_enable()") in contenders
    assert {("torch.compile", f"activation_memory_budget={b}")
            for b in hf.AMB_POINTS[:2]} <= contenders
    assert any(c.startswith("memprop") and s.startswith("50% activations")
               for c, s in contenders)
    assert any(c.startswith(LARGEST) for c, _ in contenders)
    if importlib.util.find_spec("memprop.plan.compiled") is not None:  # issue 18, item 2
        assert any(c == hf.COMPILED_PLAN and s.startswith("50% activations")
                   for c, s in contenders)
    for row in rows:
        assert set(row) >= set(COLUMNS)
        assert row["allocator_peak_bytes"] > 0 and row["step_s"] > 0, row
        assert row["peak_bytes"] == row["allocator_peak_bytes"], row  # never the ledger's
        assert (row["compile_s"] is not None) == row["compiled"], row


def test_hf_gpt2_eager_plans_peak_where_the_planner_predicts(report: BenchReport) -> None:
    """Oracle: the allocator's count (which shares nothing with the planner's chain model)
    within 1% of each eager plan's predicted peak; the head option's plans run in chunks."""
    planned = [r for r in _hf_rows(report)
               if r["predicted_peak_bytes"] is not None and not r["compiled"]]
    assert planned
    for row in planned:
        assert abs(row["peak_bytes"] - row["predicted_peak_bytes"]) <= 0.01 * row["peak_bytes"]
        if not row["contender"].startswith(LARGEST):  # the largest batch's plan may take it
            assert (row["head_chunks"] > 0) == (row["contender"] == "memprop, head option"), row


def test_hf_gpt2_goal_lines_say_met_or_missed(report: BenchReport) -> None:
    lines = [line for line in report.summary if line.startswith(("- (d) ", "- (e) ", "- (f) "))]
    assert sum(line.startswith("- (d) ") for line in lines) == 2  # one per quick AMB point
    assert sum(line.startswith(("- (e) ", "- (f) ")) for line in lines) == 2
    for line in lines:
        assert ": met" in line or ": missed" in line, line


def _row(contender: str, setting: str, *, batch: int = 8, peak: int, step_s: float,
         **extra: Any) -> dict[str, Any]:
    return {"contender": contender, "setting": setting, "batch": batch, "peak_bytes": peak,
            "step_s": step_s, "step_vs_unplanned": step_s, "compiled": False,
            "head_chunks": 0, "predicted_overhead": 0.1, "compile_s": None, **extra}


NONE = _row("none", "eager, no checkpointing", peak=1000, step_s=1.0)
AMB = _row("torch.compile", "activation_memory_budget=0.5", peak=600, step_s=0.8,
           compiled=True, compile_s=30.0)


def test_amb_goal_is_the_compiled_plans_time_over_the_points() -> None:
    """Hand-made rows: 0.72 s against the point's 0.8 s is 0.90x (met); 0.8 s is 1.00x, 5%
    over 0.95x (missed); a plan over the point's peak misses whatever its time."""
    def line(peak: int, step_s: float) -> str:
        ours = _row(hf.COMPILED_PLAN, "activation_memory_budget=0.5's peak: budget 600 B",
                    peak=peak, step_s=step_s, compiled=True)
        return hf._goal_amb(AMB, [NONE, AMB, ours], {"notes": []})

    assert "step 0.90x the point's (goal <= 0.95x: met)" in line(600, 0.72)
    assert "step 1.00x the point's (goal <= 0.95x: missed by 5%" in line(590, 0.8)
    assert "missed: its measured peak 601 B is over the point's" in line(601, 0.5)
    absent = hf._goal_amb(AMB, [NONE, AMB], {"notes": [
        "compiled plan at activation_memory_budget=0.5's peak: not built"]})
    assert "did not run: not built (goal <= 0.95x its step: missed)" in absent


def test_half_goal_takes_memprops_fastest_plan_within_the_budget() -> None:
    """Hand-made rows: of two plans within the budget the faster (0.98x) decides (met); a
    faster plan over the budget does not count."""
    document = {"half_bytes": 800, "activation_bytes": 400}
    rows = [NONE,
            _row("memprop", "50% activations: budget 800 B", peak=790, step_s=1.2),
            _row("memprop, head option", "50% activations: budget 800 B", peak=780,
                 step_s=0.98),
            _row(hf.COMPILED_PLAN, "50% activations: budget 800 B", peak=801, step_s=0.5,
                 compiled=True)]
    text = hf._goal_half(rows, document)
    assert "memprop, head option at 0.98x the eager unplanned step" in text
    assert "(goal <= 1.0x: met)" in text
    slower = hf._goal_half([NONE, rows[1]], document)
    assert "missed by 20%: only eager plans ran" in slower


def test_batch_goal_is_per_sample() -> None:
    """Hand-made rows: batch 32 (4x) in 4.8 s against batch 8 in 1 s is 1.20x per sample
    (met); in 5.6 s, 1.40x, 8% over the 1.3x bound (missed); batch 16 is 2x (missed)."""
    def line(batch: int, step_s: float) -> str:
        larger = _row(f"{LARGEST}{batch}", "largest batch", batch=batch, peak=990,
                      step_s=step_s, head_chunks=4)
        return hf._goal_batch([NONE, larger], NONE)

    assert "1.20x the eager step's time per sample" in line(32, 4.8)
    assert "(4.00x, the head in 4 chunks)" in line(32, 4.8)
    assert line(32, 4.8).endswith(": met).")
    assert "missed: 8% over the bound per sample" in line(32, 5.6)
    assert "missed: 2.00x is 33% short" in line(16, 2.0)
    assert "search's limit" not in line(32, 4.8)
    assert "is 64 (the search's limit: a larger one may fit) (8.00x" in line(64, 9.0)


def test_noise_line_is_the_spread_of_one_compiled_plans_copies() -> None:
    """Hand-made rows: two copies of one plan (AMB 1, 16 chunks) at 0.91x and 1.30x the eager
    step give that spread; a plan with other knobs alone gives none."""
    def copy(label: str, ratio: float, knobs: str) -> dict[str, Any]:
        return _row(hf.COMPILED_PLAN, f"{label}: budget 1 B, {knobs}", peak=1, step_s=ratio)

    same = "activation_memory_budget=1, head in 16 chunks"
    rows = [NONE, copy("a", 1.30, same), copy("b", 0.91, same),
            copy("c", 0.5, "activation_memory_budget=0.5")]
    assert ("2 copies of memprop's compiled plan with activation_memory_budget=1, head in 16 "
            "chunks ran at 0.91-1.30x the eager step") in hf._spread(rows)
    assert hf._spread(rows[:2] + rows[3:]) == ""
