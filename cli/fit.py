"""``memprop fit``: the largest batch whose training peak fits a budget."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from memprop.budget import resolve_budget
from memprop.errors import UsageError
from memprop.estimate import fit
from memprop.report.json_report import write_json
from memprop.report.terminal import render_fit
from memprop_cli.options import (
    SEED,
    WorkloadOptions,
    builder,
    console_for,
    output_path,
    with_workload_options,
    working,
)


@with_workload_options(exclude=("batch",))
def fit_command(
    options: WorkloadOptions,
    budget: Annotated[str | None, typer.Option(
        "--budget", metavar="SIZE",
        help="Cap on the training peak, every step of the loop: 1.5GiB, 512MiB (binary), 2GB "
             "(decimal); default: the device's free memory.")] = None,
    real: Annotated[bool, typer.Option(
        "--real", help="Verify: run the batch found for real and check its peak.")] = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", parser=output_path,
        help="Write the fit document (schema_version 1); - is "
             "standard output.")] = None,
    max_overhead: Annotated[float | None, typer.Option(
        "--max-overhead", metavar="FRACTION",
        help="With checkpointing: the largest batch at most this much extra compute allows "
             "(0.3 is 30%); default: no limit.")] = None,
) -> None:
    """The largest batch whose training peak fits the budget.

    Found by bisection on fake traces, with the headroom left, and with checkpointing."""
    console = console_for({"--json": json_path})
    if max_overhead is not None and not (math.isfinite(max_overhead) and max_overhead >= 0):
        raise UsageError(f"--max-overhead {max_overhead}: give a finite fraction >= 0 (0.3 is "
                         "30%), or leave it out for no limit")
    cap = resolve_budget(budget, options.device)
    source = (f"from --budget {budget}" if budget is not None
              else f"no --budget given, so {cap.source}")
    depth = options.depth if options.model is not None or options.depth else SEED.depth
    with working("searching for the largest batch"):
        result = fit(builder(options), budget_bytes=cap.bytes, budget_source=source,
                     depth=depth, real=real, max_overhead=max_overhead)
    render_fit(result, console)
    if json_path is not None:
        console.print(f"wrote {write_json(json_path, result.to_dict())}")
