"""``memprop run``: train under the plan and measure it against the unplanned step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memprop.budget import resolve_budget
from memprop.errors import OutOfMemoryError
from memprop.report.json_report import write_json
from memprop.units import format_bytes
from memprop_cli.errors import exits_cleanly
from memprop_cli.options import WorkloadOptions, build_workload, with_workload_options
from memprop_cli.plan import BudgetOption, CostModel, Strategy


@exits_cleanly
@with_workload_options()
def run_command(
    options: WorkloadOptions,
    budget: BudgetOption = None,
    steps: Annotated[int, typer.Option(help="Timed training steps, each way.")] = 5,
    strategy: Strategy = "optimal",
    cost_model: CostModel = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", help="Write the run document.")] = None,
) -> None:
    """Train under the plan and measure it against the unplanned step.

    Measured peak against predicted and budget, step time against the unplanned step, and
    whether the gradients match."""
    import memprop
    from memprop.errors import UsageError
    from memprop.report.terminal_plan import render_run
    from memprop.run.measure import run_plan

    if steps < 1:
        raise UsageError(f"--steps {steps}: give at least 1")
    cap = resolve_budget(budget, options.device)
    workload = build_workload(options, fake=False)
    plan = memprop.plan(workload, budget=cap.bytes, strategy=strategy,
                        cost_model=cost_model or "measured")
    result = run_plan(workload, plan, steps=steps)
    console = Console()
    if cap.source != "given":
        console.print(f"budget: {cap.source}")
    render_run(result, console)
    if options.device.startswith("cuda"):
        from memprop.devices import get_device
        from memprop.report.terminal_gpu import render_reconciliation

        # The allocator's peaks were last reset for the unplanned run, which ran last.
        layers = get_device(options.device).layers(result.baseline_peak_bytes)  # type: ignore[attr-defined]
        console.print("the unplanned step on the device:")
        render_reconciliation(layers, console)
    if json_path is not None:
        console.print(f"wrote {write_json(json_path, result.to_dict())}")
    if result.peak_bytes > plan.budget_bytes:
        raise OutOfMemoryError(
            f"the planned run peaked at {format_bytes(result.peak_bytes)}, over the budget of "
            f"{format_bytes(plan.budget_bytes)} (predicted {format_bytes(plan.peak_bytes)}): "
            "this is a planner bug; please report it with the --json document"
        )
