"""``memprop plan``: which activations to keep and which to recompute, for a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memprop.budget import resolve_budget
from memprop.errors import UsageError
from memprop.report.json_report import write_json
from memprop.units import format_bytes
from memprop_cli.options import (
    WorkloadOptions,
    build_workload,
    console_for,
    output_path,
    preflight,
    with_workload_options,
    working,
)

BudgetOption = Annotated[str | None, typer.Option(
    "--budget", metavar="SIZE",
    help="Cap on the training peak, every step of the loop: 2GiB, 512MiB, 2GB, or 90% of the "
         "device; default: what the device has free.")]
Strategy = Annotated[str, typer.Option(help="optimal, uniform (checkpoint_sequential) or none.")]
ChunkHead = Annotated[bool, typer.Option(
    "--chunk-head", help="Let the plan compute a Hugging Face causal LM's head and loss in "
    "chunks of tokens, each recomputed in backward (the logits are never made whole; the "
    "model's output logits are then zeros: for loops that read the loss alone).")]
Compile = Annotated[bool, typer.Option(
    "--compile", help="Plan the step torch.compile'd: choose torch's activation_memory_budget "
    "(and with --chunk-head the head's chunks) so that the compiled step's peak, op by op, "
    "fits the budget; each candidate is traced on fake tensors.")]
CostModel = Annotated[str, typer.Option(
    "--cost-model",
    help="How recomputation is priced: roofline (FLOPs and bytes moved at this machine's "
         "measured rates, the same plan on every run here), flops (counted FLOPs, the same plan "
         "on every machine, blind to memory-bound work) or measured (stage times of real steps, "
         "which vary from run to run).")]


def check_plan_options(strategy: str, cost_model: str, *, fake: bool) -> None:
    from memprop.plan.api import check_strategy
    from memprop.plan.costs import check_cost_model

    try:
        check_strategy(strategy)
        check_cost_model(cost_model, fake=fake)
    except UsageError as error:
        flag = "--strategy" if "strategy" in str(error) else "--cost-model"
        raise UsageError(f"{flag}: {error}") from None


def check_compiled_options(cost_model: str) -> None:
    from memprop.plan.compiled import COMPILED_COST_MODELS

    if cost_model not in COMPILED_COST_MODELS:
        raise UsageError(f"--cost-model {cost_model}: a compiled step is priced by its graphs, "
                         f"with {' or '.join(COMPILED_COST_MODELS)}")


@with_workload_options()
def plan_command(
    options: WorkloadOptions,
    budget: BudgetOption = None,
    fake: Annotated[bool, typer.Option("--fake", help="Plan on fake tensors.")] = False,
    strategy: Strategy = "optimal",
    cost_model: CostModel = "roofline",
    chunk_head: ChunkHead = False,
    compile: Compile = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", parser=output_path,
        help="Write the plan document; - is standard output.")] = None,
) -> None:
    """What to recompute so the training peak fits the budget, at the least extra compute.

    Shows uniform (checkpoint_sequential) and no checkpointing beside the chosen strategy, and
    checks the plan by tracing the planned step on fake tensors. With --compile, the knobs of
    the torch.compile'd step instead (activation_memory_budget, the head's chunks)."""
    from memprop.plan.api import chain_of
    from memprop.plan.solvers import STRATEGIES, solve
    from memprop.report.terminal_plan import render_plan
    from memprop.run.verify import verify_plan_on

    console = console_for({"--json": json_path})
    check_plan_options(strategy, cost_model, fake=fake)
    cap = resolve_budget(budget, options.device)
    if compile:
        from memprop.plan.compiled import plan_compiled
        from memprop.report.terminal_compiled import render_compiled_plan

        check_compiled_options(cost_model)
        with working("planning the compiled step"):
            workload = build_workload(options, fake=fake, say=console.print)
            compiled = plan_compiled(workload, cap.bytes, chunk_head=chunk_head,
                                     cost_model=cost_model)
        if cap.source != "given":
            console.print(f"budget: {cap.source}")
        render_compiled_plan(compiled, console)
        if json_path is not None:
            console.print(f"wrote {write_json(json_path, compiled.to_dict())}")
        return
    if not fake:
        # A plan on real tensors times the unplanned step, which must fit the device first.
        preflight(options, "planning on real tensors runs the unplanned step, which",
                  "plan it with --fake (nothing is allocated), or lower --batch")
    with working("planning"):
        workload = build_workload(options, fake=fake, say=console.print)
        workload.chunk_head = chunk_head
        chain = chain_of(workload, cost_model=cost_model, fake=fake)
        chosen = solve(chain, cap.bytes, strategy)
        others = [solve(chain, cap.bytes, s, strict=False) for s in STRATEGIES if s != strategy]
        traced, traced_on = verify_plan_on(workload, chosen)
    if cap.source != "given":
        console.print(f"budget: {cap.source}")
    render_plan(chosen, others, console)
    console.print(f"checked: the planned step traced on {traced_on} tensors peaks at "
                  f"{format_bytes(traced)} (predicted {format_bytes(chosen.peak_bytes)})")
    if json_path is not None:
        document = chosen.to_dict()
        document["traced_peak_bytes"] = traced
        document["alternatives"] = [
            {k: p.to_dict()[k] for k in ("strategy", "feasible", "min_feasible_bytes",
                                         "predicted")} for p in others]
        console.print(f"wrote {write_json(json_path, document)}")
