"""``memprop distribute``: split the step across devices, or accumulate microbatches on one?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from memprop.errors import UsageError
from memprop_cli.options import (
    OptionsFactory,
    WorkloadOptions,
    console_for,
    output_path,
    parse_sizes,
    with_workload_options,
    working,
)
from memprop_cli.plan import BudgetOption


@with_workload_options()
def distribute_command(
    options: WorkloadOptions,
    devices: Annotated[int, typer.Option(
        "--devices", metavar="N", help="Devices (ranks) available; 1 compares microbatch "
                                       "counts on one device.")] = 2,
    budget: BudgetOption = None,
    microbatches: Annotated[str, typer.Option(
        "--microbatches", metavar="M,...",
        help="Microbatch counts to try (gradients accumulated across them).")] = "1,2,4,8",
    run: Annotated[bool, typer.Option(
        "--run", help="Launch the ranks (torch.distributed) and measure every candidate.")
    ] = False,
    steps: Annotated[int, typer.Option(help="Steps each candidate runs with --run; the last "
                                            "is measured.")] = 3,
    backend: Annotated[str, typer.Option(help="torch.distributed backend: gloo (CPU) or "
                                              "nccl (GPU).")] = "gloo",
    strategy: Annotated[str, typer.Option(
        "--strategy", metavar="S,...",
        help="Strategies to consider: accumulate, ddp, zero1 (DDP with ZeroRedundancyOptimizer), "
             "fsdp (FSDP2), pipeline (the model an nn.Sequential).")
    ] = "accumulate,ddp,fsdp,pipeline",
    link: Annotated[str | None, typer.Option(
        "--link", metavar="GB/s,us",
        help="The interconnect planned for: bandwidth and latency of one message (say 100,5). "
             "Default: timed on this machine across at most its cores.")] = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", parser=output_path,
        help="Write the distribution document; - is standard output.")] = None,
) -> None:
    """Split the step across devices, or accumulate smaller microbatches on one?

    Every candidate (one device with M microbatches; DDP on --devices ranks with M microbatches
    each; ZeRO-1 when asked for; FSDP2 over --devices ranks; a pipeline over --devices ranks for
    each of torch's GPipe, 1F1B, Interleaved1F1B and LoopedBFS schedules, cut between the items
    of an nn.Sequential), with memprop's recomputation plan where the budget needs one, is predicted
    per rank from the ledger; the fastest predicted step that fits the budget is chosen.
    --batch is the global batch. With --run every candidate on at most as many ranks as this
    machine has cores runs and every rank's steady-state peak is measured; larger worlds are
    predicted only (communication priced by each collective's algorithm, never launched)."""
    from memprop.budget import resolve_budget
    from memprop.distribute import distribute
    from memprop.distribute.communication import parse_link
    from memprop.distribute.strategies import chosen
    from memprop.report.output import write_output
    from memprop.report.terminal_distribute import render_distribution

    console = console_for({"--json": json_path})
    if devices < 1:
        raise UsageError(f"--devices {devices}: give at least 1")
    counts = parse_sizes(microbatches, "--microbatches")
    strategies = [s.name for s in chosen([s.strip() for s in strategy.split(",") if s.strip()],
                                         f"--strategy {strategy}")]
    given_link = None if link is None else parse_link(link)
    cap = resolve_budget(budget, options.device)
    with working("predicting every candidate" + (" and running them" if run else "")):
        result = distribute(OptionsFactory(options), batch_size=options.batch, devices=devices,
                            budget=cap.bytes, microbatches=counts, run=run, steps=steps,
                            backend=backend, strategies=strategies, link=given_link)
    if cap.source != "given":
        console.print(f"budget: {cap.source}")
    render_distribution(result, console)
    if json_path is not None:
        write_output(json_path, json.dumps(result.to_dict(), indent=2) + "\n")
    failure, warnings = result.check()
    for warning in warnings:
        console.print(f"warning: {warning}", style="yellow")
    if failure is not None:
        raise failure
