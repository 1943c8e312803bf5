"""A torch.compile'd model: its training step profiled from inductor's graphs, planned and
checkpointed as its original module, eagerly, and the reports say which (NOTE [ Compiled models
are traced eagerly ] in memprop.trace.compiled): no crash, no error blamed on the user's
forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import memprop
from memprop.trace.compiled import COMPILED_GRAPHS_NOTE, COMPILED_NOTE, original
from memprop_cli.main import app

FACTORY = '''
import torch
from torch import nn
import memprop


def _net():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)],
                         nn.Linear(16, 4))


def make(batch_size):
    return torch.compile(_net()), torch.randn(batch_size, 16)


def plain(batch_size):
    return _net(), torch.randn(batch_size, 16)


def workload(batch_size):
    return memprop.Workload(model=torch.compile(_net()), inputs=(torch.randn(batch_size, 16),))
'''


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)],
                         nn.Linear(16, 4))


def test_a_compiled_model_is_profiled_from_its_graphs_and_its_inference_eagerly() -> None:
    net, x = _net(), torch.randn(8, 16)
    compiled = torch.compile(net)
    assert original(compiled) is net and original(net) is net
    for fake in (False, True):
        eager = memprop.profile(net, x, fake=fake)
        traced = memprop.profile(compiled, x, fake=fake)
        # The inference pass is the eager module's; the training step is the graphs' (NOTE
        # [ Tracing a compiled step ], tested against inductor in test_compiled_step.py).
        assert traced.inference_peak_bytes == eager.inference_peak_bytes
        assert any(note.startswith(COMPILED_GRAPHS_NOTE) for note in traced.notes)
        assert COMPILED_NOTE not in " ".join(traced.notes + eager.notes)


def test_a_compiled_model_is_planned_and_checkpointed() -> None:
    net, x = _net(), torch.randn(64, 16)
    compiled = torch.compile(net)
    peak = memprop.profile(net, x).training_peak_bytes
    plan = memprop.plan(compiled, x, budget=peak - 1)
    assert plan.peak_bytes < peak and COMPILED_NOTE in plan.cost_note
    expected = torch.autograd.grad(net(x).sum(), list(net.parameters()))
    wrapped = memprop.checkpoint(compiled, x, budget=peak - 1)
    got = torch.autograd.grad(wrapped(x).sum(), list(net.parameters()))
    assert all(torch.allclose(a, b) for a, b in zip(expected, got, strict=True))


@pytest.mark.parametrize("command", [
    ["profile", "--model", "compiled.py:make"],
    ["profile", "--model", "compiled.py:make", "--fake"],
    ["profile", "--model", "compiled.py:workload"],
    ["plan", "--model", "compiled.py:workload", "--budget", "1GiB"],
    ["plan", "--model", "compiled.py:make", "--budget", "1GiB", "--fake"],
])
def test_compiled_factories_on_the_command_line(command: list[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "compiled.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, "--batch", "8", "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    said = document.get("notes", []) if command[0] == "profile" else [document["cost_note"]]
    assert any("torch.compile'd" in note for note in said)
    if command[0] == "profile":
        eager = CliRunner().invoke(app, ["profile", "--model", "compiled.py:plain", "--batch",
                                         "8", "--json", "-", *command[3:]])
        assert (json.loads(eager.stdout)["memory"]["training_peak_bytes"]
                == document["memory"]["training_peak_bytes"])
