"""``memprop fit``: the largest batch whose training peak fits a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memprop.budget import resolve_budget
from memprop.errors import UsageError
from memprop.estimate import fit
from memprop.report.json_report import write_json
from memprop.report.terminal import render_fit
from memprop_cli.errors import exits_cleanly
from memprop_cli.options import WorkloadOptions, with_workload_options
from memprop_cli.sweep import builder


@exits_cleanly
@with_workload_options(exclude=("batch",))
def fit_command(
    options: WorkloadOptions,
    budget: Annotated[str | None, typer.Option(
        "--budget", metavar="SIZE",
        help="Cap on the training peak: 1.5GiB, 512MiB (binary), 2GB (decimal); default: the "
             "device's free memory.")] = None,
    real: Annotated[bool, typer.Option(
        "--real", help="Verify: run the batch found for real and check its peak.")] = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", help="Write the fit document (schema_version 1).")] = None,
    max_overhead: Annotated[float | None, typer.Option(
        "--max-overhead", metavar="FRACTION",
        help="With checkpointing: the largest batch at most this much extra compute allows "
             "(0.3 is 30%); default: no limit.")] = None,
) -> None:
    """The largest batch whose training peak fits the budget.

    Found by bisection on fake traces, with the headroom left, and with checkpointing."""
    device, depth = options.device, options.depth
    cap = resolve_budget(budget, device)
    budget_bytes = cap.bytes
    source = (f"from --budget {budget}" if budget is not None
              else f"no --budget given, so {cap.source}")
    build = builder(options)
    if options.model is None:
        depth = options.seed_config().depth
    if depth is not None and depth < 1:
        raise UsageError(f"--depth is {depth}: it must be at least 1")
    if max_overhead is not None and max_overhead < 0:
        raise UsageError(f"--max-overhead {max_overhead}: give a fraction >= 0 (0.3 is 30%)")
    result = fit(build, budget_bytes=budget_bytes, budget_source=source, depth=depth, real=real,
                 max_overhead=max_overhead)
    console = Console()
    render_fit(result, console)
    if json_path is not None:
        console.print(f"wrote {write_json(json_path, result.to_dict())}")
