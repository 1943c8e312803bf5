"""``memprop profile``: where one training step's memory goes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import memprop
from memprop.devices.cpu import fix_malloc_threshold
from memprop.report.json_report import write_json
from memprop.report.terminal import render_profile
from memprop_cli.errors import exits_cleanly
from memprop_cli.options import WorkloadOptions, build_workload, with_workload_options

Fake = Annotated[bool, typer.Option(
    "--fake", help="Trace on fake tensors: nothing is allocated, any size can be estimated.")]


@exits_cleanly
@with_workload_options()
def profile_command(
    options: WorkloadOptions,
    fake: Fake = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", help="Write the profile document (schema_version 1).")] = None,
    html_path: Annotated[Path | None, typer.Option(
        "--html", metavar="PATH", help="Write a self-contained HTML report.")] = None,
    trace_path: Annotated[Path | None, typer.Option(
        "--trace", metavar="PATH", help="Write a Chrome trace / Perfetto JSON.")] = None,
    top: Annotated[int, typer.Option(help="Rows of the saved-tensor ledger to show.")] = 12,
    create_graph: Annotated[bool, typer.Option(
        "--create-graph", help="Backward with create_graph=True (second derivatives).")] = False,
) -> None:
    """Where one training step's memory goes, tensor by tensor, against inference.

    Traces one training step and one inference pass: every tensor saved for backward, the
    totals by category, the stages, and the training and inference peaks."""
    if not fake:
        # The measured peak reads RSS: pin glibc's mmap threshold so freed tensors go back to
        # the kernel (NOTE [ Reading a peak from RSS ] in memprop.devices.cpu). Only here: every
        # large allocation then costs page faults, which would distort timings elsewhere.
        fix_malloc_threshold()
    workload = build_workload(options, fake=fake)
    result = memprop.profile(workload, create_graph=create_graph)
    console = Console()
    render_profile(result, console, top=top)
    if result.gpu_layers:
        from memprop.report.terminal_gpu import render_reconciliation

        render_reconciliation(result.gpu_layers, console)
    if json_path is not None:
        console.print(f"wrote {write_json(json_path, result.to_dict())}")
    if html_path is not None:
        from memprop.report.html import write_html

        console.print(f"wrote {write_html(html_path, result)}")
    if trace_path is not None:
        from memprop.report.chrome_trace import write_trace

        console.print(f"wrote {write_trace(trace_path, result)}")
