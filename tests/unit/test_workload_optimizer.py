"""An optimizer over parameters that are not the model's is refused (issue 16: one built over
another copy of the model was traced silently, 1.2 MB reported against 2.8 MB); a profile with
no optimizer does not speak of the optimizer's state."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprop_cli.main import app

FACTORIES = """
import copy
import torch
from torch import nn
from memprop.workload import Workload

def other_copy(batch_size=8):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    twin = copy.deepcopy(model)
    return Workload(model=model, inputs=(torch.randn(batch_size, 16),),
                    optimizer=torch.optim.AdamW(twin.parameters()))

def no_optimizer(batch_size=8):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return Workload(model=model, inputs=(torch.randn(batch_size, 16),))
"""


def test_an_optimizer_over_another_copy_is_one_line_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cases.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["profile", "--model", "cases.py:other_copy"])
    assert result.exit_code == 2, result.output
    # (torch warns of the factory's deepcopy of a fake model; memprop's own words are one line)
    lines = [line for line in result.stderr.splitlines() if line.startswith("memprop")]
    assert len(lines) == 1 and lines[0].startswith("memprop: error: ")
    assert "optimizer's parameters are not the model's: 4 of its 4" in lines[0]
    assert "Traceback" not in result.output


def test_without_an_optimizer_the_report_says_no_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cases.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["profile", "--model", "cases.py:no_optimizer"])
    assert result.exit_code == 0, result.output
    assert "optimizer's state live" not in result.stdout
    assert "no optimizer state" in result.stdout
