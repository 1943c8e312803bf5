"""``memprop sweep`` from the command line."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprop_cli.main import app

SMALL = ["--input-dim", "16", "--hidden", "32", "--classes", "4"]


@pytest.mark.install
def test_sweep_writes_its_document(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    result = CliRunner().invoke(app, ["sweep", *SMALL, "--batch", "1,8,64", "--depth", "1,2",
                                      "--json", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "depth \\ batch" in result.output and "closed form" in result.output
    document = json.loads(out.read_text())
    assert document["schema_version"] == 1
    assert document["workload"]["mode"] == "fake"
    assert [(c["depth"], c["batch_size"]) for c in document["cells"]] == [
        (d, b) for d in (1, 2) for b in (1, 8, 64)]
    for cell in document["cells"]:
        assert cell["status"] == "ok"
        assert cell["training_peak_bytes"] == cell["closed_form_training_peak_bytes"]
        assert set(cell) >= {"batch_size", "depth", "training_peak_bytes", "inference_peak_bytes",
                             "saved_activations_bytes", "status"}


@pytest.mark.install
def test_sweep_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.svg"
    result = CliRunner().invoke(app, ["sweep", *SMALL, "--batch", "1,8", "--depth", "1,2",
                                      "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize(("arguments", "message"), [
    (["--batch", "1,x"], "not a list of integers"),
    (["--batch", "0,4"], "must be between 1 and"),
    (["--plot", "out.pdf"], ".png or .svg"),
])
def test_bad_input_exits_2(arguments: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["sweep", *SMALL, *arguments])
    assert result.exit_code == 2
    assert message in result.output


def test_depth_for_a_factory_without_depth_is_refused(tmp_path: Path) -> None:
    factory = tmp_path / "factory.py"
    factory.write_text(textwrap.dedent("""
        import torch
        def make(batch_size):
            return torch.nn.Linear(8, 2), torch.randn(batch_size, 8)
    """))
    runner = CliRunner()
    refused = runner.invoke(app, ["sweep", "--model", f"{factory}:make", "--depth", "1,2"])
    assert refused.exit_code == 2
    assert "takes no 'depth' argument" in refused.output
    swept = runner.invoke(app, ["sweep", "--model", f"{factory}:make", "--batch", "1,2,4"])
    assert swept.exit_code == 0, swept.output


@pytest.mark.slow
def test_sixteen_cells_of_hundreds_of_gib_stay_small_and_fast(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", "from memprop_cli.main import main; main()", "sweep",
         "--hidden", "1024", "--batch", "1,64,4096,262144", "--depth", "1,8,64,256",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    wall_s = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    cells = json.loads(out.read_text())["cells"]
    assert len(cells) == 16
    assert max(c["training_peak_bytes"] for c in cells) > 200 * 2**30
    assert peak_rss < 3 * 2**30
    # How long it took is a benchmark figure, not a test: print it for whoever runs -s.
    print(f"16-cell sweep: {wall_s:.1f} s, peak RSS {peak_rss / 2**20:.0f} MiB")
