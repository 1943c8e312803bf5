"""``memprop plan``: which activations to keep and which to recompute, for a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memprop.budget import resolve_budget
from memprop.report.json_report import write_json
from memprop_cli.errors import exits_cleanly
from memprop_cli.options import (
    SEED,
    Activation,
    Batch,
    Bias,
    Classes,
    Depth,
    Device,
    Dtype,
    Hidden,
    InputDim,
    Model,
    Optimizer,
    WeightDecay,
    build_workload,
    workload_options,
)

BudgetOption = Annotated[str | None, typer.Option(
    "--budget", metavar="SIZE",
    help="Cap on the training peak: 2GiB, 512MiB, 2GB, or 90% of the device; default: what the "
         "device has free.")]
Strategy = Annotated[str, typer.Option(help="optimal, uniform (checkpoint_sequential) or none.")]
CostModel = Annotated[str | None, typer.Option(
    "--cost-model", help="measured (stage times) or flops (the same plan on every machine); "
                         "default: measured, or flops with --fake.")]


@exits_cleanly
def plan_command(
    model: Model = None,
    input_dim: InputDim = SEED.input_dim,
    hidden: Hidden = SEED.hidden,
    classes: Classes = SEED.classes,
    depth: Depth = None,
    batch: Batch = SEED.batch,
    activation: Activation = SEED.activation,
    bias: Bias = SEED.bias,
    weight_decay: WeightDecay = SEED.weight_decay,
    dtype: Dtype = SEED.dtype,
    device: Device = SEED.device,
    optimizer: Optimizer = SEED.optimizer,
    budget: BudgetOption = None,
    fake: Annotated[bool, typer.Option("--fake", help="Plan on fake tensors (FLOP costs).")] =
    False,
    strategy: Strategy = "optimal",
    cost_model: CostModel = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", help="Write the plan document.")] = None,
) -> None:
    """Pick what to recompute so the training peak fits the budget at the least extra compute,
    with uniform (checkpoint_sequential) and no checkpointing beside it."""
    from memprop.plan.api import chain_of
    from memprop.plan.solvers import STRATEGIES, solve
    from memprop.report.terminal_plan import render_plan

    options = workload_options(
        model=model, input_dim=input_dim, hidden=hidden, classes=classes, depth=depth,
        batch=batch, activation=activation, bias=bias, weight_decay=weight_decay, dtype=dtype,
        device=device, optimizer=optimizer,
    )
    cap = resolve_budget(budget, device)
    costs = cost_model or ("flops" if fake else "measured")
    if strategy not in STRATEGIES:
        from memprop.errors import UsageError

        raise UsageError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    workload = build_workload(options, fake=fake)
    if fake and costs == "measured":
        from memprop.errors import UsageError

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
