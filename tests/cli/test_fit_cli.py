"""``memprop fit`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprop.closed_form import SeedShape, closed_form
from memprop.units import parse_size
from memprop_cli.main import app

SMALL = ["--input-dim", "16", "--hidden", "32", "--classes", "4", "--depth", "2"]


def _peak(batch: int) -> int:
    shape = SeedShape(input_dim=16, hidden=32, classes=4, depth=2, batch=batch)
    return closed_form(shape)["training_peak_bytes"]


@pytest.mark.install
def test_fit_real_writes_its_document(tmp_path: Path) -> None:
    out = tmp_path / "fit.json"
    budget = _peak(200) + 10
    result = CliRunner().invoke(app, ["fit", *SMALL, "--budget", str(budget), "--real",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    batch = document["max_batch_size"]
    assert _peak(batch) <= budget < _peak(batch + 1)
    assert document["budget_bytes"] == budget
    assert document["headroom_bytes"] == budget - _peak(batch)
    assert document["max_batch_size_with_checkpointing"] >= batch
    assert document["verification"]["fits"] is True
    assert document["verification"]["training_peak_bytes"] == _peak(batch)
    assert "largest batch that fits" in result.output and "fits" in result.output


def test_without_budget_the_free_memory_is_the_budget_said_plainly() -> None:
    result = CliRunner().invoke(app, ["fit", *SMALL], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "no --budget given" in result.output and "available memory" in result.output


def test_budget_that_does_not_parse_exits_2() -> None:
    result = CliRunner().invoke(app, ["fit", *SMALL, "--budget", "lots"])
    assert result.exit_code == 2
    assert "does not parse" in result.output


def test_batch_one_over_budget_exits_3_with_the_smallest_budget() -> None:
    result = CliRunner().invoke(app, ["fit", *SMALL, "--budget", str(_peak(1) - 1)])
    assert result.exit_code == 3
    advised = result.output.split("raise the budget to at least ", 1)[1].split()[0]
    assert f"{_peak(1):,} bytes" in result.output and parse_size(advised) >= _peak(1)


def test_checkpointing_within_an_overhead_cap(tmp_path: Path) -> None:
    """A deep MLP whose activations dominate: checkpointing lets a larger batch fit, and a cap
    on the extra compute gives a batch between the two."""
    deep = ["--input-dim", "16", "--hidden", "64", "--classes", "4", "--depth", "8"]
    shape = SeedShape(input_dim=16, hidden=64, classes=4, depth=8, batch=512)
    budget = closed_form(shape)["training_peak_bytes"]
    documents = []
    for extra in ([], ["--max-overhead", "0.2"]):
        out = tmp_path / f"fit{len(extra)}.json"
        result = CliRunner().invoke(app, ["fit", *deep, "--budget", str(budget), *extra,
                                          "--json", str(out)])
        assert result.exit_code == 0, result.output
        documents.append(json.loads(out.read_text()))
    free, capped = documents
    assert free["max_batch_size"] == capped["max_batch_size"] == 512
    assert capped["checkpointing_compute_overhead"] <= 0.2
    assert 512 < capped["max_batch_size_with_checkpointing"] \
        <= free["max_batch_size_with_checkpointing"]


def test_negative_overhead_cap_exits_2() -> None:
    result = CliRunner().invoke(app, ["fit", *SMALL, "--budget", "1MiB", "--max-overhead", "-1"])
    assert result.exit_code == 2 and "--max-overhead" in result.stderr
