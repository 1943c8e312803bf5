"""The sweep and fit renderers, on a captured console."""

from __future__ import annotations

import io

from rich.console import Console

from memprop.estimate import fit, seed_builder, sweep
from memprop.report.terminal import render_fit, render_sweep
from memprop.units import format_bytes
from memprop.workload import SeedConfig

SMALL = SeedConfig(input_dim=16, hidden=32, classes=4)


def _console() -> Console:
    return Console(width=160, file=io.StringIO(), color_system=None)


def test_render_sweep_shows_every_cell_and_the_lines() -> None:
    result = sweep(seed_builder(SMALL), batch_sizes=(1, 1024, 2048), depths=(1, 2))
    console = _console()
    render_sweep(result, console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for cell in result.cells:
        assert format_bytes(cell.training_peak_bytes or 0) in text
    assert "2/3" not in text and "3/3" in text  # every cell equals the closed form
    assert "non-zero residual" in text


def test_render_fit_says_the_budget_and_the_batch() -> None:
    result = fit(seed_builder(SMALL), budget_bytes=1 << 20, budget_source="from --budget 1MiB",
                 depth=1)
    console = _console()
    render_fit(result, console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "from --budget 1MiB" in text and str(result.max_batch_size) in text
    assert f"{result.headroom_bytes:,} bytes left" in text
