"""The public API as a typed caller sees it: mypy --strict accepts a training script's calls."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_memprop_plan_type_checks_for_a_typed_caller(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    script = tmp_path / "train.py"
    script.write_text(
        "import torch\n"
        "from torch import nn\n"
        "import memprop\n"
        "\n"
        "model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))\n"
        "x = torch.randn(4, 8)\n"
        "plan = memprop.plan(model, x, budget='1MiB', cost_model='flops')\n"
        "peak: int = plan.peak_bytes\n"
        "overhead: float = plan.compute_overhead\n"
        "wrapped = memprop.checkpoint(model, x, budget='1MiB')\n"
        "profile = memprop.profile(model, x, fake=True)\n"
        "required: int = profile.required_bytes\n"
        "size: int = memprop.parse_size('1.5GiB')\n"
        "\n"
        "def make(batch_size: int) -> memprop.Workload:\n"
        "    return memprop.Workload(model=model, inputs=(torch.randn(batch_size, 8),))\n"
        "\n"
        "split = memprop.distribute(make, batch_size=8, devices=2, budget='1GiB')\n"
        "chosen: int = split.chosen\n"
    )
    # Errors inside memprop are its own test's (mypy on the package); an installed package's
    # are not reported to its users either.
    stdout, stderr, status = api.run(["--strict", "--follow-imports=silent", "--cache-dir",
                                      str(tmp_path / ".mypy"), str(script)])
    assert status == 0, stdout + stderr
