"""One error map for every path that runs the user's code (``memprop.blame``): the fake
pre-check before a real run, the fake and real traces, the inference pass, sweep cells, fit's
probes, plan and run. The user's mistake is exit 2 with one line on stderr (naming their file
and line where there is one), never a traceback; each test names the path it covers."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprop_cli.main import app

# memprop.blame tells the user's frames from memprop's by where memprop is installed.
pytestmark = pytest.mark.install

MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    def widths(batch_size):
        """Torch's own modules only, of the wrong widths: no frame of the user's to name."""
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(5, 3)), torch.randn(batch_size, 8)

    ''')


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "broken.py").write_text("import torch\n\ndef make(batch_size) return 1\n")
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def _fails_in_one_line(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"a traceback: {result.exception!r}")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("memprop: error: ") and result.stderr.count("\n") == 1, (
        result.stderr)
    return result.stderr


WIDTHS = "a and b must have same reduction dim"
REAL_WIDTHS = "mat1 and mat2 shapes cannot be multiplied"


@pytest.mark.parametrize("command", [
    pytest.param(["profile"], id="profile: the fake pre-check's inference pass"),
    pytest.param(["profile", "--fake"], id="profile --fake: the fake trace"),
    pytest.param(["plan", "--budget", "1GiB", "--fake"], id="plan --fake: the chain's trace"),
    pytest.param(["plan", "--budget", "1GiB"], id="plan: the real trace"),
    pytest.param(["run", "--budget", "1GiB", "--steps", "1"], id="run: the plan on fake tensors"),
    pytest.param(["fit", "--budget", "1GiB"], id="fit: the bisection's probes"),
    pytest.param(["sweep", "--batch", "2,4"], id="sweep: every cell"),
])
def test_a_model_of_torchs_modules_that_fails_is_the_users_error(project: Path,
                                                                 command: list[str]) -> None:
    err = _fails_in_one_line(*command, "--model", "models.py:widths",
                             *([] if command[0] in ("fit", "sweep") else ["--batch", "4"]))
    # A fake kernel's refusal does not stop a real profile (a fake kernel can be stricter than
    # the real one): the real step raises the real kernel's error.
    expected = REAL_WIDTHS if command == ["profile"] else WIDTHS
    assert "raised RuntimeError" in err and expected in err


@pytest.mark.parametrize("command", [["profile"], ["profile", "--fake"], ["sweep"]])
def test_a_model_file_with_a_syntax_error_names_its_line(project: Path,
                                                         command: list[str]) -> None:
    err = _fails_in_one_line(*command, "--model", "broken.py:make")
    assert "SyntaxError" in err and "broken.py:3" in err and "def make(batch_size) return 1" in err
