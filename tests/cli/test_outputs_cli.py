"""Output paths as the command line takes them: checked before the work, '-' is standard
output (the human report then goes to standard error), reports already on disk are kept."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from memprop_cli.main import app

SMALL = ["--input-dim", "16", "--hidden", "32", "--depth", "2", "--batch", "8", "--fake"]


def test_json_to_standard_output_leaves_it_pure_json() -> None:
    result = CliRunner().invoke(app, ["profile", *SMALL, "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["schema_version"] == 1
    assert "Where the training step's memory goes" in result.stderr
    assert not Path("-").exists()


@pytest.mark.parametrize(("arguments", "message"), [
    (["--json", "same.json", "--html", "same.json"], "both name same.json"),
    (["--json", "-", "--trace", "-"], "standard output"),
    (["--json", "."], "folder"),
])
def test_clashing_outputs_are_refused_before_any_work(tmp_path: Path, arguments: list[str],
                                                      message: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    import memprop

    def no_work(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the work started before the outputs were checked")

    monkeypatch.setattr(memprop, "profile", no_work)
    result = CliRunner().invoke(app, ["profile", *SMALL, *arguments])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []


def test_sweep_plot_without_matplotlib_is_refused_before_the_sweep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def without_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_matplotlib)
    import memprop_cli.sweep

    monkeypatch.setattr(memprop_cli.sweep, "sweep", lambda *a, **k: pytest.fail("the sweep ran"))
    result = CliRunner().invoke(app, ["sweep", "--hidden", "8", "--batch", "1,2", "--depth", "1",
                                      "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2
    assert "pip install 'memprop[plot]'" in result.stderr


@pytest.mark.install
def test_bench_keeps_reports_on_disk_unless_asked(tmp_path: Path) -> None:
    (tmp_path / "planner-solve-times.md").write_text("mine")
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--only", "planner", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "planner-solve-times.md").read_text() == "mine"
    result = runner.invoke(app, ["bench", "--only", "planner,planner", "--quick", "--out",
                                 str(tmp_path), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "planner-solve-times.md").read_text().startswith("# ")


def test_bench_only_takes_the_list_syntax_of_every_flag(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "--only", "planner,nonsense", "--out",
                                      str(tmp_path)])
    assert result.exit_code == 2 and "--only nonsense" in result.stderr
