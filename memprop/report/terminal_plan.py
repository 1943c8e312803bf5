"""Rich reports of plans and of planned runs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from memprop.plan.solvers import Plan, cli_size
from memprop.run.measure import RunResult
from memprop.trace.compiled import original
from memprop.trace.head import STEP_GRADIENT_RTOL
from memprop.units import format_bytes
from memprop.workload import Workload

__all__ = ["optimizer_state_note", "render_plan", "render_run"]


def render_plan(plan: Plan, alternatives: list[Plan], console: Console) -> None:
    """The stages (kept, dropped, recomputed how often), then the strategies side by side."""
    stages = Table(title=f"Plan '{plan.strategy}' for a budget of "
                         f"{format_bytes(plan.budget_bytes)} ({plan.cost_model} costs)",
                   title_justify="left")
    for name in ("stage", "tape", "forward runs"):
        stages.add_column(name, justify="left" if name != "forward runs" else "right")
    for row in plan.stages():
        if row.get("head_chunks"):
            tape = Text(f"kept, the head and loss in {row['head_chunks']} chunks",
                        style="green")
        elif row["tape"] == "kept":
            tape = Text("kept", style="green")
        elif row["tape"] == "selective":
            tape = Text(f"dropped but {len(row['keeps'])} op outputs "
                        f"({format_bytes(row['keeps_bytes'])})", style="cyan")
        else:
            tape = Text("dropped", style="yellow")
        stages.add_row(row["name"], tape, str(row["recomputes"] + 1))
    console.print(stages)
    if plan.cost_note:
        console.print(plan.cost_note)
    console.print(_comparison([plan, *alternatives]))
    headroom = plan.budget_bytes - plan.peak_bytes
    console.print(
        f"predicted peak {format_bytes(plan.peak_bytes)} against a budget of "
        f"{format_bytes(plan.budget_bytes)} ({format_bytes(headroom)} to spare), "
        f"{plan.compute_overhead:.1%} more compute than the unplanned step, whose peak is "
        f"{format_bytes(plan.baseline_peak_bytes)}"
    )


def _comparison(plans: list[Plan]) -> Table:
    table = Table(title="Strategies for this budget", title_justify="left")
    for name in ("strategy", "fits", "predicted peak", "extra compute", "least budget"):
        table.add_column(name, justify="left" if name in ("strategy", "fits") else "right")
    for plan in plans:
        table.add_row(
            plan.strategy,
            Text("yes", style="green") if plan.feasible else Text("no", style="red"),
            format_bytes(plan.peak_bytes),
            f"{plan.compute_overhead:.1%}",
            cli_size(plan.min_feasible_bytes),  # rounded up: a budget that plans
        )
    return table


def render_run(result: RunResult, console: Console, workload: Workload | None = None) -> None:
    """The measured steps by both mechanisms (the ledger, the allocator), the timed steps, and
    the gradients and buffers against the unplanned run. Given the run's ``workload``, the
    notes say only what applies to it (an optimizer's state, which buffers); without it, they
    name what may apply."""
    plan = result.plan
    steps_note = optimizer_state_note(workload)
    measured = len(result.step_peaks_bytes)
    table = Table(title=f"{measured} measured and {result.steps} timed training steps under "
                        f"plan '{plan.strategy}' ({plan.cost_model} costs)",
                  title_justify="left")
    for name in ("", "planned", "unplanned", "budget / predicted"):
        table.add_column(name, justify="left" if not name else "right")

    def unplanned(text: str) -> str:
        return "not run" if result.baseline_step_peaks_bytes is None else text

    allocator = result.allocator_peak_bytes
    within = allocator <= plan.budget_bytes
    budget = f"{format_bytes(plan.budget_bytes)} / {format_bytes(plan.peak_bytes)}"
    if result.allocator_step_peaks_bytes:
        table.add_row("peak (allocator)",
                      Text(format_bytes(allocator), style="green" if within else "bold red"),
                      unplanned(format_bytes(result.baseline_allocator_peak_bytes or 0)), budget)
        table.add_row("peak (ledger)", format_bytes(result.peak_bytes),
                      unplanned(format_bytes(result.baseline_peak_bytes or 0)),
                      f"{(result.peak_bytes - allocator) / max(1, allocator):+.2%} of the "
                      "allocator's")
        _steps_row(table, "allocator", result.allocator_step_peaks_bytes,
                   result.baseline_allocator_step_peaks_bytes, unplanned, steps_note)
    else:
        table.add_row("peak (ledger)",
                      Text(format_bytes(result.peak_bytes),
                           style="green" if within else "bold red"),
                      unplanned(format_bytes(result.baseline_peak_bytes or 0)), budget)
    _steps_row(table, "ledger", result.step_peaks_bytes, result.baseline_step_peaks_bytes,
               unplanned, steps_note)
    if result.baseline_step_s:
        ratio = f"{result.step_s / result.baseline_step_s:.2f}x measured / "
        baseline_ms = f"{result.baseline_step_s * 1e3:.2f} ms"
    else:
        ratio, baseline_ms = "", "not run"
    table.add_row("step time", f"{result.step_s * 1e3:.2f} ms", baseline_ms,
                  f"{ratio}{1 + plan.compute_overhead:.2f}x predicted")
    table.add_row("gradients", _verdict(result.gradients_match), "",
                  f"step 1 within {STEP_GRADIENT_RTOL:g} (the head in {plan.head_chunks} chunks)"
                  if plan.head_chunks else "bit for bit on the CPU")
    buffers = _buffers_note(workload)
    if buffers:
        table.add_row("buffers", _verdict(result.buffers_match), "", buffers)
    console.print(table)
    sources = f"peak (ledger): {result.peak_source}"
    if result.allocator_step_peaks_bytes:
        sources = (f"peak (allocator), against which the budget and the prediction are "
                   f"checked: {result.allocator_source}; {sources}")
    timing = "step time: the median of the timed steps, measured by neither"
    if result.measured_step_s:
        timing += (f" (a measured step took {result.measured_step_s * 1e3:.2f} ms under both "
                   "mechanisms)")
    console.print(Text(f"{sources}; {timing}", style="dim"))
    if workload is not None and original(workload.model) is not workload.model:
        console.print(Text("the model is torch.compile'd: both runs stepped its original module "
                           "eagerly, as the plan was made (memprop run --compile plans and "
                           "runs the compiled step)", style="dim"))


def _steps_row(table: Table, mechanism: str, steps: tuple[int, ...],
               baseline: tuple[int, ...] | None, unplanned: Callable[[str], str],
               note: str) -> None:
    table.add_row(f"steps 1-{len(steps)} ({mechanism})",
                  "\n".join(format_bytes(p) for p in steps),
                  unplanned("\n".join(format_bytes(p) for p in baseline or ())), note)


def optimizer_state_note(workload: Workload | None) -> str:
    """Why step 1 may differ from the rest: an optimizer makes its state there."""
    if workload is None:
        return "step 1 makes the\noptimizer's state, if any"
    return "step 1 makes the\noptimizer's state" if _keeps_state(workload.optimizer) else ""


def _keeps_state(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer`` makes state at its first step: every optimizer but plain SGD
    (no momentum), which steps from the gradients alone."""
    if optimizer is None:
        return False
    if type(optimizer) is torch.optim.SGD:
        return any(group.get("momentum", 0) for group in optimizer.param_groups)
    return True


def _buffers_note(workload: Workload | None) -> str:
    """What the buffers compared are, or "" where the model has none (no row then)."""
    if workload is None:
        return "running statistics, if any"
    if not any(True for _ in workload.model.buffers()):
        return ""
    kinds = sorted({type(m).__name__ for m in workload.model.modules()
                    if isinstance(m, nn.modules.batchnorm._NormBase)})
    if kinds:
        return f"{', '.join(kinds)} statistics"
    return "the model's buffers"


def _verdict(same: bool | None) -> Text | str:
    if same is None:
        return "not compared"
    return "match" if same else Text("DIFFER", style="bold red")
