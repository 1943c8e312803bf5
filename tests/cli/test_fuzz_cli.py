"""Fuzzing the command line: users' models (``fuzz_corpus.py``) and drawn flag values, good
and bad. Whatever comes in, every command ends in 0, 2 or 3; an error is one line on stderr
(``memprop: ...``), never a traceback, never a signal. The models are ones plain PyTorch
trains, so profiling them must succeed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memprop_cli.main import app

CORPUS = Path(__file__).with_name("fuzz_corpus.py")
MODELS = ["lora", "tied", "dict_output", "gru", "encoder_decoder", "moe", "half", "double",
          "bfloat16", "batchnorm", "keywords"]
COMPILED = ["compiled", "compiled_workload"]


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    shutil.copy(CORPUS, tmp_path / "corpus.py")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("corpus", None)


def _holds_the_promise(code: int, stderr: str, args: list[str]) -> None:
    """The README's exit codes: 0 done, 2 bad input, 3 does not fit; an error in one line."""
    assert code in (0, 2, 3), f"exit {code} for {args}: {stderr[-2000:]}"
    assert "Traceback" not in stderr, f"a traceback for {args}: {stderr[-2000:]}"
    if code:
        lines = stderr.splitlines()
        assert lines and lines[-1].startswith("memprop: "), f"{args}: {stderr[-2000:]}"
        assert not any(line.startswith("memprop: ") for line in lines[:-1]), stderr


def _invoke(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args} raised {result.exception!r}") from result.exception
    _holds_the_promise(result.exit_code, result.stderr, args)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("command", [
    ["profile", "--fake", "--batch", "4"],
    ["profile", "--batch", "4"],
    ["plan", "--fake", "--budget", "1GiB", "--batch", "4"],
    ["sweep", "--batch", "2,4"],
], ids=lambda args: " ".join(args[:2]))
def test_users_models_on_every_command(corpus: Path, model: str, command: list[str]) -> None:
    code, _, err = _invoke([*command, "--model", f"corpus.py:{model}"])
    if command[0] == "profile":
        assert code == 0, err  # plain PyTorch trains every model of the corpus


@pytest.mark.slow
@pytest.mark.parametrize("model", COMPILED)
@pytest.mark.parametrize("fake", [True, False], ids=["fake", "real"])
def test_compiled_models_end_without_a_signal(corpus: Path, model: str, fake: bool) -> None:
    # A process of its own: a compiled model once ended memprop with signal 11.
    args = ["profile", "--batch", "4", "--model", f"corpus.py:{model}", *(["--fake"] * fake)]
    done = subprocess.run([sys.executable, "-c", "from memprop_cli.main import main; main()",
                           *args], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode >= 0, f"killed by signal {-done.returncode}: {done.stderr[-2000:]}"
    _holds_the_promise(done.returncode, done.stderr, args)
    assert done.returncode == 0, done.stderr[-2000:]


SEED = ["--input-dim", "8", "--hidden", "8", "--classes", "3"]
COMMANDS = {
    "profile": ["profile", "--fake"],
    "profile-real": ["profile"],
    "plan": ["plan", "--fake"],
    "plan-real": ["plan"],
    "run": ["run", "--steps", "1"],
    "fit": ["fit"],
    "sweep": ["sweep"],
}
VALUES = {
    "--batch": ["4", "0", "-3", "1.5", "abc", "", "1000000000000", "9" * 40, "2,4"],
    "--depth": ["2", "0", "-1", "x", "281474976710657", "3,4"],
    "--budget": ["1GiB", "1", "0", "-5", "150%", "0%", "50%", "nan", "inf", "1.5.5GiB", "GiB",
                 " 2 MiB ", "9" * 300, "1e9"],
    "--dtype": ["float64", "bfloat16", "float8", "int32"],
    "--optimizer": ["adamw", "momentum", "lion"],
    "--activation": ["gelu", "swish"],
    "--weight-decay": ["0.1", "-1", "nan", "inf"],
    "--strategy": ["uniform", "none", "best"],
    "--cost-model": ["flops", "measured", "magic"],
    "--top": ["0", "3", "-1"],
    "--max-overhead": ["0.3", "-0.1", "nan"],
    "--json": ["-", "out.json", "", "out/", "."],
    "--blocks": ["layers", "", "nowhere"],
    "--device": ["cpu", "tpu", "cuda:x"],
    "--bogus": ["1"],
}


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(COMMANDS)),
       flags=st.dictionaries(st.sampled_from(sorted(VALUES)), st.integers(0, 300), max_size=3))
def test_drawn_flag_values_end_in_0_2_or_3_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str,
        flags: dict[str, int]) -> None:
    monkeypatch.chdir(tmp_path)
    args = [*COMMANDS[command], *SEED]
    for flag, index in flags.items():
        values = VALUES[flag]
        args += [flag, values[index % len(values)]]
    if "--batch" not in flags and command not in ("sweep", "fit"):
        args += ["--batch", "4"]  # the default batch, 512, is slow to run for real
    if command == "sweep" and "--depth" not in flags:
        args += ["--depth", "1,2"]
    code, _, _ = _invoke(args)
    event(f"exit {code}")
