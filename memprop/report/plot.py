"""A sweep as a picture: training and inference peaks against batch size (one line per depth)
and against depth (one line per batch size). matplotlib is imported here only, when a plot is
asked for: it is the optional ``plot`` extra."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from memprop.errors import UsageError
from memprop.estimate.sweep import Sweep
from memprop.report.output import write_output

__all__ = ["check_plot_path", "write_sweep_plot"]

_FORMATS = {".png": "png", ".svg": "svg"}
_GIB = 1024**3


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise UsageError(
            "a plot needs matplotlib, which is not installed: pip install 'memprop[plot]'"
        ) from error
    return Figure


def check_plot_path(path: str | Path) -> str:
    """The format ``path``'s suffix names, once matplotlib is known to be there: called before
    the work starts, so a plot that cannot be drawn costs a second, not the sweep."""
    target = Path(path)
    fmt = _FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise UsageError(f"plot {target}: the suffix says the format; use .png or .svg")
    _figure_class()
    return fmt


def write_sweep_plot(path: str | Path, sweep: Sweep) -> str:
    """Draw the sweep to ``path``; the suffix (``.png`` or ``.svg``) says the format. Return how
    to name the destination in a message (``write_output``'s rules apply)."""
    fmt = check_plot_path(path)
    figure = _figure_class()(figsize=(12, 4.8), layout="constrained")
    by_batch, by_depth = figure.subplots(1, 2)
    ok = [c for c in sweep.cells if c.status == "ok"]
    colors = [f"C{i % 10}" for i in range(max(len(sweep.depths), len(sweep.batch_sizes)))]
    for color, depth in zip(colors, sweep.depths, strict=False):
        cells = sorted((c for c in ok if c.depth == depth), key=lambda c: c.batch_size)
        label = "" if depth is None else f"depth {depth}"
        xs = [c.batch_size for c in cells]
        by_batch.plot(xs, [(c.training_peak_bytes or 0) / _GIB for c in cells], "o-",
                      color=color, label=f"{label} training".strip())
        by_batch.plot(xs, [(c.inference_peak_bytes or 0) / _GIB for c in cells], "s--",
                      color=color, alpha=0.7, label=f"{label} inference".strip())
    by_batch.set(xscale="log", yscale="log", xlabel="batch size", ylabel="peak (GiB)",
                 title="Peak against batch size (solid: training, dashed: inference)")
    depths = [d for d in sweep.depths if d is not None]
    if len(depths) > 1:
        for color, batch in zip(colors, sweep.batch_sizes, strict=False):
            cells = sorted((c for c in ok if c.batch_size == batch and c.depth is not None),
                           key=lambda c: c.depth or 0)
            xs = [c.depth or 0 for c in cells]
            by_depth.plot(xs, [(c.training_peak_bytes or 0) / _GIB for c in cells], "o-",
                          color=color, label=f"batch {batch} training")
            by_depth.plot(xs, [(c.inference_peak_bytes or 0) / _GIB for c in cells], "s--",
                          color=color, alpha=0.7, label=f"batch {batch} inference")
        by_depth.set(xscale="log", yscale="log", xlabel="depth (hidden layers)",
                     ylabel="peak (GiB)", title="Peak against depth")
        by_depth.set_xticks(depths, labels=[str(d) for d in depths])
        by_depth.set_xticks([], minor=True)
    else:
        by_depth.text(0.5, 0.5, "one depth only: nothing to draw against depth",
                      ha="center", va="center", transform=by_depth.transAxes)
        by_depth.set_axis_off()
    for axes in (by_batch, by_depth):
        if axes.lines:
            axes.grid(True, which="both", alpha=0.3)
            axes.legend(fontsize=7, ncol=2)
    figure.suptitle(f"memprop sweep: {sweep.workload.get('name', '')} "
                    f"({sweep.mode} tensors)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=110)
    return write_output(path, buffer.getvalue())
