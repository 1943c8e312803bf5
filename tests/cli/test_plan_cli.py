"""``memprop plan`` and ``memprop run`` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprop_cli.main import app

# Activations dominate this MLP's peak, so checkpointing has something to save.
MLP = ["--input-dim", "32", "--hidden", "64", "--depth", "6", "--batch", "256"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _plan(runner: CliRunner, tmp_path: Path, budget: str, *extra: str) -> dict[str, object]:
    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["plan", *MLP, "--budget", budget, *extra, "--json", str(out)])
    assert result.exit_code == 0, result.output
    document: dict[str, object] = json.loads(out.read_text())
    return document


@pytest.mark.install
def test_plan_fits_a_budget_below_the_unplanned_peak(runner: CliRunner, tmp_path: Path) -> None:
    generous = _plan(runner, tmp_path, "1GiB", "--cost-model", "flops")
    baseline = generous["baseline"]["peak_bytes"]  # type: ignore[index]
    floor = generous["min_feasible_bytes"]
    assert isinstance(baseline, int) and isinstance(floor, int) and floor < baseline
    assert generous["predicted"]["compute_overhead"] == 0  # type: ignore[index]
    budget = (floor + baseline) // 2
    tight = _plan(runner, tmp_path, str(budget), "--cost-model", "flops")
    assert tight["feasible"] is True and tight["budget_bytes"] == budget
    assert tight["predicted"]["peak_bytes"] <= budget  # type: ignore[index,operator]
    assert tight["predicted"]["compute_overhead"] > 0  # type: ignore[index,operator]
    assert {s["tape"] for s in tight["stages"]} == {"kept", "dropped"}  # type: ignore[attr-defined,index]
    strategies = {a["strategy"] for a in tight["alternatives"]}  # type: ignore[attr-defined,index]
    assert strategies == {"uniform", "none"}
    assert set(tight) >= {"schema_version", "budget_bytes", "strategy", "cost_model", "feasible",
                          "min_feasible_bytes", "stages", "schedule", "predicted", "baseline"}


def test_fake_plans_equal_real_plans_priced_by_the_roofline(runner: CliRunner,
                                                           tmp_path: Path) -> None:
    real = _plan(runner, tmp_path, "1GiB")
    fake = _plan(runner, tmp_path, "1GiB", "--fake")
    assert fake["cost_model"] == real["cost_model"] == "roofline"
    assert "GFLOP/s" in str(fake["cost_note"])
    assert fake["baseline"] == real["baseline"]
    assert fake["min_feasible_bytes"] == real["min_feasible_bytes"]


def test_an_infeasible_budget_exits_3_with_what_would_fit(runner: CliRunner) -> None:
    result = runner.invoke(app, ["plan", *MLP, "--budget", "1KiB", "--fake"])
    assert result.exit_code == 3
    assert "smallest feasible peak" in result.stderr and "raise the budget" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "lots"], "does not parse"),
        (["--budget", "120%"], "100%"),
        (["--budget", "1GiB", "--strategy", "magic"], "--strategy"),
        (["--budget", "1GiB", "--fake", "--cost-model", "measured"], "real tensors"),
    ],
)
def test_plan_bad_input_exits_2(runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["plan", *MLP, *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


@pytest.mark.install
def test_run_measures_the_plan_and_matches_gradients(runner: CliRunner, tmp_path: Path) -> None:
    planned = _plan(runner, tmp_path, "1GiB", "--cost-model", "flops")
    floor, baseline = planned["min_feasible_bytes"], planned["baseline"]["peak_bytes"]  # type: ignore[index]
    budget = (floor + baseline) // 2  # type: ignore[operator]
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", *MLP, "--budget", str(budget), "--steps", "2",
                                 "--cost-model", "flops", "--json", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["gradients_match"] is True
    measured = document["measured"]
    assert measured["peak_bytes"] <= budget
    assert abs(measured["peak_bytes"] - document["predicted"]["peak_bytes"]) <= 0.02 * budget
    assert measured["baseline_peak_bytes"] == baseline
    assert len(measured["step_peaks_bytes"]) == 3  # the first step, then two steady ones
    assert max(measured["step_peaks_bytes"]) == measured["peak_bytes"]
    assert "match" in result.stdout
