"""``memprop bench``: run the benchmarks and write reports/."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memprop_cli.errors import exits_cleanly

PARTS = ("ledger", "planner", "gpu", "runtime")


@exits_cleanly
def bench_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the reports.")] = Path("reports"),
    only: Annotated[list[str] | None, typer.Option(
        "--only", help=f"Run only these parts: {', '.join(PARTS)}.")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Few repeats and short chains: checks the machinery, not the goals.")
    ] = False,
) -> None:
    """Measure the speed and memory goals side by side and write Markdown and JSON reports."""
    from memprop.bench.gpu import gpu_report
    from memprop.bench.ledger import ledger_overhead
    from memprop.bench.planner import planner_solve_times
    from memprop.bench.runtime import runtime_curves, write_runtime_plot
    from memprop.errors import UsageError

    chosen = only or list(PARTS)
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        raise UsageError(f"--only {', '.join(unknown)}: the parts are {', '.join(PARTS)}")
    console = Console()
    command = "memprop bench" + (" --quick" if quick else "")
    for part in chosen:
        with console.status(f"bench: {part}"):
            if part == "ledger":
                report = ledger_overhead(repeats=3 if quick else 21)
            elif part == "gpu":
                gpu = gpu_report(quick=quick)
                if gpu is None:
                    console.print("gpu: skipped, no CUDA device")
                    continue
                report = gpu
            elif part == "runtime":
                report = runtime_curves(quick=quick)
            else:
                report = planner_solve_times((10, 30) if quick else (10, 30, 100, 300, 1000))
        report = dataclasses.replace(report, command=command)
        for line in report.summary:
            console.print(line)
        written = report.write(out)
        if part == "runtime":
            written.append(write_runtime_plot(report, out / f"{report.name}.png"))
        for path in written:
            console.print(f"wrote {path}")
