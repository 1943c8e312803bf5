"""``memprop profile`` as a user runs it: exit codes, output, the JSON document, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

import memprop
from memprop.workload import SeedConfig, seed_workload
from memprop_cli.main import app

SMALL = ["--input-dim", "16", "--hidden", "32", "--depth", "2", "--batch", "8"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.install
def test_profile_prints_the_report_and_writes_design_json(
    runner: CliRunner, tmp_path: Path
) -> None:
    out = tmp_path / "profile.json"
    result = runner.invoke(app, ["profile", *SMALL, "--json", str(out)])
    assert result.exit_code == 0, result.output
    for words in ("training peak", "inference peak", "saved activations", "Saved for backward",
                  "Stages", "layers.0"):
        assert words in result.stdout
    document = json.loads(out.read_text())
    assert document["schema_version"] == 1
    assert set(document) >= {"schema_version", "tool", "device", "workload", "memory",
                             "measured", "saved_tensors", "stages"}
    assert set(document["memory"]) >= {
        "parameters_bytes", "gradients_bytes", "optimizer_state_bytes", "inputs_bytes",
        "saved_activations_bytes", "training_peak_bytes", "inference_peak_bytes"}
    assert set(document["saved_tensors"][0]) == {"id", "op", "module", "shape", "dtype", "bytes",
                                                 "born", "freed"}
    assert set(document["stages"][0]) >= {"name", "forward_s", "backward_s", "flops",
                                          "input_bytes", "saved_bytes", "output_bytes"}
    assert document["workload"] == {
        "name": "seed-mlp", "batch_size": 8, "depth": 2, "dtype": "float32", "device": "cpu",
        "mode": "real", "set_to_none": True, "config": document["workload"]["config"]}
    # The command reports what the library computes for the same workload.
    expected = memprop.profile(seed_workload(SeedConfig(input_dim=16, hidden=32, depth=2,
                                                        batch=8)))
    assert document["memory"] == json.loads(json.dumps(expected.to_dict()["memory"]))
    assert document["closed_form"]["training_peak_bytes"] == expected.training_peak_bytes


def test_fake_gives_the_same_figures_without_measuring(runner: CliRunner, tmp_path: Path) -> None:
    real, fake = tmp_path / "real.json", tmp_path / "fake.json"
    assert runner.invoke(app, ["profile", *SMALL, "--json", str(real)]).exit_code == 0
    assert runner.invoke(app, ["profile", *SMALL, "--fake", "--json", str(fake)]).exit_code == 0
    real_doc, fake_doc = json.loads(real.read_text()), json.loads(fake.read_text())
    assert fake_doc["memory"] == real_doc["memory"]
    assert fake_doc["workload"]["mode"] == "fake" and fake_doc["measured"] is None
    # The resident high-water mark carries page rounding and the interpreter's own churn: a
    # cross-check within a few MiB of the ledger, not an equality.
    gap = real_doc["measured"]["training_peak_bytes"] - real_doc["memory"]["training_peak_bytes"]
    assert abs(gap) <= 16 * 2**20


def test_fake_traces_a_model_far_larger_than_this_machine(runner: CliRunner,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "big.json"
    args = ["profile", "--fake", "--hidden", "65536", "--depth", "8", "--batch", "65536",
            "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    memory = json.loads(out.read_text())["memory"]
    assert memory["training_peak_bytes"] > 100 * 1024**3  # hundreds of GiB, nothing allocated


FACTORY = '''
import torch
from torch import nn

def build(batch_size, depth=2):
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8) for _ in range(depth)]
    return nn.Sequential(*layers), torch.randn(batch_size, 8)

def broken(batch_size):
    raise RuntimeError("the data set is not there")

def no_batch():
    return None
'''


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "factory.py"
    path.write_text(FACTORY)
    return path


@pytest.mark.install
def test_model_factory_from_a_file(runner: CliRunner, factory_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["profile", "--model", f"{factory_file}:build", "--batch", "4",
                                 "--depth", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["workload"]["batch_size"] == 4 and document["workload"]["depth"] == 3
    assert len(document["stages"]) == 3
    assert document["memory"]["parameters_bytes"] == 3 * (8 * 8 + 8) * 4
    assert "mean" in document["loss"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nowhere.py:build"], "does not exist"),
        (["--model", "FACTORY:missing"], "has no function"),
        (["--model", "FACTORY:broken"], "the data set is not there"),
        (["--model", "FACTORY:no_batch"], "batch_size"),
        (["--model", "no_colon_here"], "package.module:func"),
        (["--model", "surely_not_a_module_xyz:func"], "no module named"),
        (["--dtype", "float8"], "--dtype"),
        (["--activation", "swish"], "--activation"),
        (["--batch", "0"], "--batch"),
        (["--depth", "0"], "--depth"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(runner: CliRunner, factory_file: Path,
                                         args: list[str], message: str) -> None:
    args = [a.replace("FACTORY", str(factory_file)) for a in args]
    result = runner.invoke(app, ["profile", "--batch", "8", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert message in result.stderr
    assert result.stderr.startswith("memprop: error: ")
    assert result.stderr.count("\n") == 1


def test_cuda_without_a_gpu_is_a_clear_error(runner: CliRunner,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever this machine has
    result = runner.invoke(app, ["profile", *SMALL, "--device", "cuda"])
    assert result.exit_code == 2
    assert "no CUDA GPU" in result.stderr


def test_json_to_a_folder_is_refused_and_the_folder_kept(runner: CliRunner,
                                                         tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["profile", *SMALL, "--json", str(tmp_path)])
    assert result.exit_code == 2
    assert "is a folder" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_profile_flags_are_pinned() -> None:
    """A new or renamed flag is a change to a public contract: make it here on purpose."""
    profile = get_command(app).commands["profile"]  # type: ignore[attr-defined]
    flags = {opt for p in profile.params for opt in p.opts}
    assert flags == {
        "--model", "--input-dim", "--hidden", "--classes", "--depth", "--batch", "--activation",
        "--bias", "--weight-decay", "--dtype", "--device", "--optimizer", "--set-to-none",
        "--blocks", "--fake", "--json", "--html", "--trace", "--top", "--create-graph",
    }


@pytest.mark.install
def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and memprop.__version__ in result.stdout
