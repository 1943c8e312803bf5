"""Inputs from the battery of hostile ones (issue 17) that ended in a traceback, a wrong exit
code or a file clobbered: each is now exit 2 (bad input) or 3 (does not fit) with one line on
stderr, before any work where the input alone decides."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprop_cli.main import app

SMALL = ["--input-dim", "16", "--hidden", "32", "--depth", "2", "--batch", "8"]

FACTORIES = textwrap.dedent('''
    import sys

    import torch
    from torch import nn


    def doubles(batch_size):
        return nn.Linear(8, 4), torch.randn(batch_size, 8, dtype=torch.float64)


    def integers(batch_size):
        return nn.Linear(8, 4), torch.randint(0, 3, (batch_size, 8))


    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 4)

        def forward(self, x):
            return self.l(x)


    def rejected_dict(batch_size):
        return Positional(), {"y": torch.randn(batch_size, 8)}


    def exits(batch_size):
        sys.exit(3)


    def fails(batch_size):
        raise RuntimeError("no data")


    def own_batch(batch_size=3):
        return nn.Linear(8, 4), torch.randn(batch_size, 8)


    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 2)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x)}


    def two_heads(batch_size):
        return TwoHeads(), torch.randn(batch_size, 8)


    def nan_inputs(batch_size):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                              nn.Linear(8, 4))
        return model, torch.full((batch_size, 8), float("nan"))
    ''')


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def _refused(*args: str, code: int = 2) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"a traceback: {result.exception!r}")
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("memprop: error: ") and result.stderr.count("\n") == 1, (
        result.stderr)
    return result.stderr


HUGE = "9" * 300


@pytest.mark.parametrize("command", [
    ["plan", *SMALL, "--fake", "--budget", HUGE],
    ["run", *SMALL, "--budget", HUGE + "GiB"],
    ["fit", "--budget", HUGE],
    ["distribute", *SMALL, "--budget", HUGE],
], ids=["plan", "run", "fit", "distribute"])
def test_a_budget_of_hundreds_of_digits_is_refused(command: list[str]) -> None:
    assert "more than 8 EiB" in _refused(*command)


def test_a_percentage_of_hundreds_of_digits_is_refused_without_echoing_them() -> None:
    err = _refused("plan", *SMALL, "--fake", "--budget", HUGE + "%")
    assert "a percentage must be above 0% and at most 100%" in err and HUGE not in err


@pytest.mark.parametrize("command", [
    ["profile", "--bogus"],
    ["profile", "extra"],
    ["profile", "--top", "many"],
    ["profile", "--batch", "x"],
    ["profile", "--depth", "1.5"],
    ["profile", "--bias", "yes"],
    ["profile", "--json"],
    ["run", "--steps", "abc"],
    ["run", "--budget"],
    ["plan", "--budget", "1GiB", "--fake", "extra"],
    ["plan", "--strategy"],
    ["sweep", "--batch"],
    ["sweep", "--real", "yes"],
    ["fit", "--max-overhead", "lots"],
    ["bench", "--only"],
    ["no-such-command"],
    ["--no-such-flag"],
], ids=lambda args: " ".join(args))
def test_option_parsing_errors_are_one_line(command: list[str]) -> None:
    err = _refused(*command)
    assert "--help" in err  # where to look


@pytest.mark.parametrize(("command", "flag"), [
    (["profile", *SMALL, "--fake", "--top", "-1"], "--top"),
    (["profile", *SMALL, "--fake", "--weight-decay", "nan"], "--weight-decay"),
    (["profile", *SMALL, "--fake", "--weight-decay", "inf"], "--weight-decay"),
    (["fit", "--budget", "1GiB", "--max-overhead", "nan"], "--max-overhead"),
])
def test_out_of_range_numbers_are_refused(command: list[str], flag: str) -> None:
    assert flag in _refused(*command)


@pytest.mark.parametrize("command", [
    ["profile", *SMALL, "--fake", "--json", "out/"],
    ["sweep", "--batch", "2", "--depth", "1", "--json", "out/"],
    ["plan", *SMALL, "--fake", "--budget", "1GiB", "--json", "out/"],
    ["distribute", *SMALL, "--json", "out/"],
])
def test_an_output_path_ending_in_a_slash_is_a_folder_not_a_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert "names a folder" in _refused(*command)
    assert not (tmp_path / "out").exists()


def test_sweep_keeps_an_existing_json_when_every_cell_fails(project: Path) -> None:
    (project / "sweep.json").write_text("mine")
    assert "every cell failed" in _refused("sweep", "--model", "factories.py:fails",
                                           "--batch", "2,4", "--json", "sweep.json")
    assert (project / "sweep.json").read_text() == "mine"


def test_bench_refuses_a_folder_it_cannot_write_before_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import memprop.bench.planner

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark ran before --out was checked")

    monkeypatch.setattr(memprop.bench.planner, "planner_solve_times", no_work)
    (tmp_path / "a-file").write_text("")
    assert "cannot be written" in _refused("bench", "--only", "planner", "--quick",
                                           "--out", str(tmp_path / "a-file" / "reports"))


def test_plan_on_real_tensors_is_checked_on_fake_tensors_first() -> None:
    err = _refused("plan", "--budget", "1GiB", "--batch", "1000000000000", code=3)
    assert "nothing was run" in err and "--fake" in err


@pytest.mark.parametrize(("factory", "cause"), [
    ("doubles", "must have the same dtype"),
    ("integers", "must have the same dtype"),
    ("rejected_dict", "unexpected keyword argument 'y'"),
])
def test_inputs_the_model_rejects_are_the_users_error_in_the_pre_check(
        project: Path, factory: str, cause: str) -> None:
    err = _refused("profile", "--model", f"factories.py:{factory}", "--batch", "4")
    assert "raised" in err and cause in err


def test_sys_exit_in_a_factory_is_said(project: Path) -> None:
    err = _refused("profile", "--model", "factories.py:exits", "--batch", "4")
    assert "called sys.exit(3)" in err and "factories.py:" in err


@pytest.mark.install
def test_a_package_file_with_relative_imports_is_imported_as_part_of_its_package(
        project: Path) -> None:
    (project / "pkg").mkdir()
    (project / "pkg" / "__init__.py").write_text("")
    (project / "pkg" / "common.py").write_text("WIDTH = 8\n")
    (project / "pkg" / "file.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from .common import WIDTH

        def make(batch_size):
            return nn.Linear(WIDTH, 2), torch.randn(batch_size, WIDTH)
        '''))
    result = CliRunner().invoke(app, ["profile", "--model", "pkg/file.py:make", "--batch", "4",
                                      "--fake", "--json", "-"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["memory"]["parameters_bytes"] == (8 * 2 + 2) * 4


def test_without_batch_the_factorys_own_default_runs_and_is_said(project: Path) -> None:
    result = CliRunner().invoke(app, ["profile", "--model", "factories.py:own_batch", "--fake",
                                      "--json", "-"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["workload"]["batch_size"] == 3
    assert "batch 3: the default of factories.py:own_batch's batch_size" in result.stderr
    result = CliRunner().invoke(app, ["profile", "--model", "factories.py:own_batch", "--fake",
                                      "--batch", "5", "--json", "-"])
    assert json.loads(result.stdout)["workload"]["batch_size"] == 5
    assert "the default of" not in result.stderr


def test_the_loss_note_of_a_dict_output_says_what_was_summed(project: Path) -> None:
    result = CliRunner().invoke(app, ["profile", "--model", "factories.py:two_heads", "--fake",
                                      "--batch", "4", "--json", "-"])
    assert result.exit_code == 0, result.stderr
    loss = json.loads(result.stdout)["loss"]
    assert loss.startswith("the sum of .float().mean() of the output's 2 tensors")


def test_piped_tables_keep_their_numbers_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # a pipe: no terminal, no width given
    result = CliRunner().invoke(app, ["sweep", "--batch", "1,1000000", "--depth", "1,4",
                                      "--hidden", "8192"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    assert "inference per example" in result.stdout  # the last column's header, whole


def test_run_says_why_gradients_of_nan_inputs_differ(project: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--model", "factories.py:nan_inputs", "--batch",
                                      "4", "--budget", "1GiB", "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert "the gradients cannot match: input 0 holds NaN or inf" in result.stdout


@pytest.mark.parametrize("command", [
    ["profile", "--fake"], ["sweep", "--batch", "2"], ["plan", "--fake", "--budget", "1GiB"],
    ["fit", "--budget", "1GiB"]], ids=lambda args: args[0])
def test_cuda_on_a_cpu_build_of_torch_is_refused_even_on_fake_tensors(
        monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    import torch

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)  # whatever this torch is
    assert "is a CPU build" in _refused(*command, "--depth", "2", "--device", "cuda")


def test_a_deep_workload_says_how_long_its_trace_will_take(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import memprop_cli.options

    # Any depth from DEEP on is said (the threshold lowered, so the test stays small).
    monkeypatch.setattr(memprop_cli.options, "DEEP", 16)
    result = CliRunner().invoke(app, ["profile", "--fake", "--depth", "16", "--hidden", "8",
                                      "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert "depth 16: tracing the step takes about" in result.stderr
    result = CliRunner().invoke(app, ["profile", "--fake", "--depth", "15", "--hidden", "8",
                                      "--batch", "2"])
    assert "tracing the step takes" not in result.stderr


def test_memprops_warnings_are_one_line_of_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    import memprop_cli.plan
    from memprop.errors import PlanMismatchWarning

    checked = memprop_cli.plan.check_plan_options

    def check_and_warn(*args: object, **kwargs: object) -> None:
        # Any of memprop's warnings, raised while a command runs (here as its options are
        # checked): the command shows it.
        warnings.warn("the traced peak strays", PlanMismatchWarning, stacklevel=2)
        checked(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(memprop_cli.plan, "check_plan_options", check_and_warn)
    result = CliRunner().invoke(app, ["plan", *SMALL, "--fake", "--budget", "1GiB"])
    assert result.exit_code == 0, result.output
    assert result.stderr == "warning: the traced peak strays\n"


def test_the_seed_mlp_too_deep_for_the_device_is_refused_from_its_closed_form() -> None:
    # Its trace would take as long as its depth; the formulas answer at once.
    err = _refused("profile", "--hidden", "65536", "--depth", "64", code=3)
    assert "(the closed form's least)" in err and "nothing was run" in err
