"""``memprop plan``: which activations to keep and which to recompute, for a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memprop.budget import resolve_budget
from memprop.errors import UsageError
from memprop.report.json_report import write_json
from memprop_cli.errors import exits_cleanly
from memprop_cli.options import WorkloadOptions, build_workload, with_workload_options

BudgetOption = Annotated[str | None, typer.Option(
    "--budget", metavar="SIZE",
    help="Cap on the training peak: 2GiB, 512MiB, 2GB, or 90% of the device; default: what the "
         "device has free.")]
Strategy = Annotated[str, typer.Option(help="optimal, uniform (checkpoint_sequential) or none.")]
CostModel = Annotated[str | None, typer.Option(
    "--cost-model", help="measured (stage times) or flops (the same plan on every machine); "
                         "default: measured, or flops with --fake.")]


@exits_cleanly
@with_workload_options()
def plan_command(
    options: WorkloadOptions,
    budget: BudgetOption = None,
    fake: Annotated[bool, typer.Option("--fake", help="Plan on fake tensors (FLOP costs).")] =
    False,
    strategy: Strategy = "optimal",
    cost_model: CostModel = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", help="Write the plan document.")] = None,
) -> None:
    """What to recompute so the training peak fits the budget, at the least extra compute.

    Shows uniform (checkpoint_sequential) and no checkpointing beside the chosen strategy."""
    from memprop.plan.api import chain_of
    from memprop.plan.solvers import STRATEGIES, solve
    from memprop.report.terminal_plan import render_plan

    cap = resolve_budget(budget, options.device)
    costs = cost_model or ("flops" if fake else "measured")
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    workload = build_workload(options, fake=fake)
    if fake and costs == "measured":
        raise UsageError("--cost-model measured needs real tensors: drop --fake or use "
                         "--cost-model flops")
    chain = chain_of(workload, cost_model=costs, fake=fake)
    chosen = solve(chain, cap.bytes, strategy)
    others = [solve(chain, cap.bytes, s, strict=False) for s in STRATEGIES if s != strategy]
    console = Console()
    if cap.source != "given":
        console.print(f"budget: {cap.source}")
    render_plan(chosen, others, console)
    if json_path is not None:
        document = chosen.to_dict()
        document["alternatives"] = [
            {k: p.to_dict()[k] for k in ("strategy", "feasible", "min_feasible_bytes",
                                         "predicted")} for p in others]
        console.print(f"wrote {write_json(json_path, document)}")
