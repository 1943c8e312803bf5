"""``memprop bench``: run the benchmarks and write reports/."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from memprop.errors import UsageError
from memprop_cli.options import console_for, parse_list, working

PARTS = ("ledger", "planner", "gpu", "runtime", "distribute")


def _files(part: str, quick: bool) -> list[str]:
    """The files a part writes, known before it runs (the GPU's report is named after it)."""
    if part == "gpu":
        import torch

        if not torch.cuda.is_available():
            return []
        from memprop.bench.gpu import report_name

        stem = report_name(torch.cuda.get_device_name())
    else:
        stem = {"ledger": "ledger-overhead", "planner": "planner-solve-times",
                "runtime": "runtime-curves", "distribute": "split-or-accumulate"}[part]
    plotted = part == "runtime" or (part == "distribute" and not quick)
    return [f"{stem}.md", f"{stem}.json"] + ([f"{stem}.png"] if plotted else [])


def _check_writable(out: Path) -> None:
    """Refuse a folder the reports cannot be written to now, not after the benchmark's minutes:
    it is created and a file is made and removed in it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".memprop-probe-"):
            pass
    except OSError as error:
        raise UsageError(f"--out {out} cannot be written ({error.strerror or error}): give a "
                         "folder you can write to") from None


def bench_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the reports.")] = Path("reports"),
    only: Annotated[list[str] | None, typer.Option(
        "--only", metavar="PART[,PART...]",
        help=f"Run only these parts: {', '.join(PARTS)} (commas, or the flag repeated).")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Few repeats and short chains: checks the machinery, not the goals.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace reports already in --out (they are kept otherwise).")
    ] = False,
) -> None:
    """Measure the speed and memory goals side by side and write Markdown and JSON reports."""
    from memprop.bench.distribute import split_or_accumulate, write_distribute_plot
    from memprop.bench.gpu import gpu_report
    from memprop.bench.ledger import ledger_overhead
    from memprop.bench.planner import planner_solve_times
    from memprop.bench.runtime import runtime_curves, write_runtime_plot

    chosen = [part for text in only or [",".join(PARTS)] for part in parse_list(text, "--only")]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown or not chosen:
        raise UsageError(f"--only {', '.join(unknown) or '(empty)'}: the parts are "
                         f"{', '.join(PARTS)}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder for the reports")
    _check_writable(out)
    taken = [str(out / name) for part in chosen for name in _files(part, quick)
             if (out / name).exists()]
    if taken and not overwrite:
        raise UsageError(f"--out {out} holds reports this run would replace ({', '.join(taken)}): "
                         "give another --out, or --overwrite to replace them")
    console = console_for({})
    command = "memprop bench" + (" --quick" if quick else "")
    for part in chosen:
        with working(f"bench: {part}"):
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
            elif part == "distribute":
                report = split_or_accumulate(quick=quick)
            else:
                report = planner_solve_times((10, 30) if quick else (10, 30, 100, 200, 300, 1000))
        report = dataclasses.replace(report, command=command)
        for line in report.summary:
            console.print(line)
        written = report.write(out)
        if part == "runtime":
            written.append(write_runtime_plot(report, out / f"{report.name}.png"))
        if part == "distribute" and not quick:
            written.append(write_distribute_plot(report, out / f"{report.name}.png"))
        for path in written:
            console.print(f"wrote {path}")
