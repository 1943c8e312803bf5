"""A factory that casts its own model works as in plain PyTorch, on real and fake tensors (NOTE
[ A factory's own casts on fake tensors ] in memprop.trace.fake)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from memprop.trace.fake import new_fake_mode
from memprop_cli.main import app

FACTORIES = '''
import torch
from torch import nn


def _net():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def half(batch_size):
    return _net().half(), torch.randn(batch_size, 16).half()


def double(batch_size):
    return _net().double(), torch.randn(batch_size, 16, dtype=torch.float64)


def bfloat16(batch_size):
    return _net().to(torch.bfloat16), torch.randn(batch_size, 16).to(torch.bfloat16)
'''

CASTS = {"half": torch.float16, "double": torch.float64, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("cast", ["half", "double", "bfloat16"])
def test_a_fake_module_casts_as_a_real_one(cast: str) -> None:
    with new_fake_mode():
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        before = model[0].weight
        cast_model = getattr(model, cast)() if cast != "bfloat16" else model.to(torch.bfloat16)
        out = cast_model(torch.ones(3, 4, dtype=CASTS[cast]))
    assert cast_model is model and out.dtype == CASTS[cast]
    assert {p.dtype for p in model.parameters()} == {CASTS[cast]}
    assert model[0].weight is before  # swapped in place, as torch does


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "casts.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _peak(*args: str) -> int:
    result = CliRunner().invoke(app, [*args, "--json", "-"])
    assert result.exit_code == 0, result.output
    return int(json.loads(result.stdout)["memory"]["training_peak_bytes"])


@pytest.mark.parametrize("cast", ["half", "double", "bfloat16"])
def test_a_factory_that_casts_its_model_is_profiled_real_and_fake_alike(
        cast: str, factories: Path) -> None:
    spec = f"casts.py:{cast}"
    real = _peak("profile", "--model", spec, "--batch", "8")
    assert real == _peak("profile", "--model", spec, "--batch", "8", "--fake")
    # The parameters alone, in the cast's own element size, bound the peak from below.
    parameters = (16 * 32 + 32 + 32 * 4 + 4) * torch.empty(0, dtype=CASTS[cast]).element_size()
    assert real > 2 * parameters


def test_a_factory_that_casts_its_model_is_swept_and_converted(factories: Path) -> None:
    result = CliRunner().invoke(app, ["sweep", "--model", "casts.py:half", "--batch", "1,8",
                                      "--json", "-"])
    assert result.exit_code == 0, result.output
    assert {c["status"] for c in json.loads(result.stdout)["cells"]} == {"ok"}
    # --dtype converts a fake model the factory cast itself, as it converts a real one.
    assert _peak("profile", "--model", "casts.py:half", "--batch", "8", "--dtype", "float32",
                 "--fake") == _peak("profile", "--model", "casts.py:half", "--batch", "8",
                                    "--dtype", "float32")
