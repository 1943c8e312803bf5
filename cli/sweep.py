"""``memprop sweep``: training and inference peaks over batch sizes and depths."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memprop.errors import OutOfMemoryError, WorkloadError
from memprop.estimate import SweepCell, sweep
from memprop.report.json_report import write_json
from memprop.report.terminal import render_sweep
from memprop_cli.options import (
    WorkloadOptions,
    builder,
    console_for,
    output_path,
    parse_sizes,
    say_trace_time,
    with_workload_options,
)


@with_workload_options(exclude=("batch", "depth"))
def sweep_command(
    options: WorkloadOptions,
    batch: Annotated[str, typer.Option(
        "--batch", metavar="B1,B2,...", help="Batch sizes (columns).")] = "1,64,4096",
    depth: Annotated[str | None, typer.Option(
        "--depth", metavar="D1,D2,...",
        help="Depths (rows); seed MLP default 1,8,64; passed to a factory that accepts depth.",
    )] = None,
    real: Annotated[bool, typer.Option(
        "--real", help="Run every cell for real (a cell that runs out of memory, or is "
                       "predicted to, is recorded as oom).")] = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", parser=output_path,
        help="Write the sweep document (schema_version 1).")] = None,
    plot_path: Annotated[Path | None, typer.Option(
        "--plot", metavar="PATH", parser=output_path,
        help="Draw the peaks against batch and depth (.png, .svg).",
    )] = None,
) -> None:
    """Training and inference peaks against batch size and depth.

    Every cell is traced on fake tensors (nothing allocated, any size) unless --real."""
    console = console_for({"--json": json_path, "--plot": plot_path})
    batch_sizes = parse_sizes(batch, "--batch")
    if depth is not None:
        depths: tuple[int | None, ...] = parse_sizes(depth, "--depth")
    else:
        depths = (1, 8, 64) if options.model is None else (None,)
    if plot_path is not None:
        from memprop.report.plot import check_plot_path

        check_plot_path(plot_path)
    build = builder(options)
    if any(d is not None for d in depths):
        say_trace_time(options, max(d for d in depths if d is not None))
    progress = Progress(
        TextColumn("sweeping"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), console=Console(stderr=True), transient=True,
        disable=not sys.stderr.isatty(),
    )
    with progress:
        task = progress.add_task("", total=len(batch_sizes) * len(depths))

        def advance(cell: SweepCell) -> None:
            depth_text = "" if cell.depth is None else f", depth {cell.depth}"
            progress.update(task, advance=1,
                            description=f"batch {cell.batch_size}{depth_text}: {cell.status}")

        result = sweep(build, batch_sizes=batch_sizes, depths=depths, real=real,
                       on_cell=advance)
    render_sweep(result, console)
    if not any(cell.status == "ok" for cell in result.cells):
        # Before any output is written: a failed command leaves the files it names as they were.
        first = next(cell.message for cell in result.cells if cell.message)
        if any(cell.status == "oom" for cell in result.cells):
            raise OutOfMemoryError(f"no cell fit the device: {first}")
        raise WorkloadError(f"every cell failed: {first}")
    if json_path is not None:
        console.print(f"wrote {write_json(json_path, result.to_dict())}")
    if plot_path is not None:
        from memprop.report.plot import write_sweep_plot

        console.print(f"wrote {write_sweep_plot(plot_path, result)}")
