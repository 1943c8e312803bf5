"""The sweep plot: PNG and SVG by suffix, and a clear error without matplotlib."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from memprop.errors import UsageError
from memprop.estimate import Sweep, seed_builder, sweep
from memprop.report.plot import write_sweep_plot
from memprop.workload import SeedConfig

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def small_sweep() -> Sweep:
    return sweep(seed_builder(SeedConfig(input_dim=16, hidden=32, classes=4)),
                 batch_sizes=(1, 64), depths=(1, 2))


def test_png_and_svg(small_sweep: Sweep, tmp_path: Path) -> None:
    png = write_sweep_plot(tmp_path / "s.png", small_sweep)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = write_sweep_plot(tmp_path / "s.SVG", small_sweep)
    assert ET.parse(svg).getroot().tag.endswith("svg")
    with pytest.raises(UsageError, match=r"\.png or \.svg"):
        write_sweep_plot(tmp_path / "s.pdf", small_sweep)


def test_missing_matplotlib_says_how_to_install(
    small_sweep: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UsageError, match=r"pip install 'memprop\[plot\]'"):
        write_sweep_plot(tmp_path / "s.png", small_sweep)
