"""``memprop profile``: where one training step's memory goes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import memprop
from memprop.devices.cpu import fix_malloc_threshold
from memprop.errors import UsageError
from memprop.report.json_report import write_json
from memprop.report.terminal import render_profile
from memprop_cli.options import (
    WorkloadOptions,
    build_workload,
    console_for,
    output_path,
    preflight,
    with_workload_options,
    working,
)

Fake = Annotated[bool, typer.Option(
    "--fake", help="Trace on fake tensors: nothing is allocated, any size can be estimated.")]


@with_workload_options()
def profile_command(
    options: WorkloadOptions,
    fake: Fake = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", parser=output_path,
        help="Write the profile document (schema_version 1); - is "
             "standard output.")] = None,
    html_path: Annotated[Path | None, typer.Option(
        "--html", metavar="PATH", parser=output_path,
        help="Write a self-contained HTML report.")] = None,
    trace_path: Annotated[Path | None, typer.Option(
        "--trace", metavar="PATH", parser=output_path,
        help="Write a Chrome trace / Perfetto JSON.")] = None,
    top: Annotated[int, typer.Option(help="Rows of the saved-tensor ledger to show.")] = 12,
    create_graph: Annotated[bool, typer.Option(
        "--create-graph", help="Backward with create_graph=True (second derivatives).")] = False,
) -> None:
    """Where a training step's memory goes, tensor by tensor, against inference.

    Traces the steady-state training step (the optimizer's state allocated, as from the second
    step of your loop on; the first step too when it differs) and one inference pass: every
    tensor saved for backward, the totals by category, the stages, and the peaks."""
    if top < 0:
        raise UsageError(f"--top {top}: give a number of rows >= 0")
    console = console_for({"--json": json_path, "--html": html_path, "--trace": trace_path})
    if not fake:
        preflight(options, "this training step", "estimate it with --fake, or lower --batch")
        # The measured peak reads RSS: pin glibc's mmap threshold so freed tensors go back to
        # the kernel (NOTE [ Reading a peak from RSS ] in memprop.devices.cpu). Only here: every
        # large allocation then costs page faults, which would distort timings elsewhere.
        fix_malloc_threshold()
    with working("tracing the training step"):
        workload = build_workload(options, fake=fake, say=console.print)
        result = memprop.profile(workload, create_graph=create_graph)
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
