"""Rich reports of compiled plans (``memprop plan|run --compile``)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from memprop.plan.compiled import CompiledPlan
from memprop.report.terminal_plan import optimizer_state_note
from memprop.run.compiled import CompiledRunResult
from memprop.units import format_bytes
from memprop.workload import Workload

__all__ = ["render_compiled_plan", "render_compiled_run"]


def _head(chunks: int) -> str:
    return f"in {chunks} chunks" if chunks else "as it is"


def render_compiled_plan(plan: CompiledPlan, console: Console) -> None:
    """The candidates traced (AMB, head, peaks, price), the chosen one marked, then the choice."""
    table = Table(title=f"Compiled step for a budget of {format_bytes(plan.budget_bytes)} "
                        f"({plan.cost_model} costs): candidates traced on fake tensors",
                  title_justify="left")
    for name in ("activation_memory_budget", "head", "peak op by op (held)",
                 "peak (fusion modelled)", "saved for backward", "extra compute"):
        table.add_column(name, justify="right" if name != "head" else "left")
    reference = plan.candidates[0].cost
    for candidate in sorted(plan.candidates, key=lambda c: (c.head_chunks,
                                                            -c.activation_memory_budget)):
        chosen = (candidate.activation_memory_budget == plan.activation_memory_budget
                  and candidate.head_chunks == plan.head_chunks)
        fits = candidate.bound_peak_bytes <= plan.budget_bytes
        style = "bold green" if chosen else ("" if fits else "dim")
        table.add_row(
            Text(f"{candidate.activation_memory_budget:g}" + (" (chosen)" if chosen else ""),
                 style=style),
            _head(candidate.head_chunks),
            Text(format_bytes(candidate.bound_peak_bytes), style="" if fits else "red"),
            format_bytes(candidate.predicted_peak_bytes),
            format_bytes(candidate.saved_activations_bytes),
            f"{candidate.cost / reference - 1:+.1%}" if reference else "",
        )
    console.print(table)
    console.print(
        f"chosen: activation_memory_budget={plan.activation_memory_budget:g}, the head "
        f"{_head(plan.head_chunks)}; peak {format_bytes(plan.bound_peak_bytes)} op by op "
        f"(held to the budget of {format_bytes(plan.budget_bytes)}), "
        f"{format_bytes(plan.predicted_peak_bytes)} with inductor's fusion modelled; "
        f"{plan.compute_overhead:+.1%} compute against the unplanned compiled step, whose peak "
        f"is {format_bytes(plan.baseline_bound_peak_bytes)} op by op")
    for note in plan.notes:
        console.print(Text(note, style="dim"))


def render_compiled_run(result: CompiledRunResult, console: Console,
                        workload: Workload | None = None) -> None:
    """The compiled steps by the allocator against the eager unplanned ones, and the gradients
    (``workload``: the run's, or a mirror of it, for what applies: ``optimizer_state_note``)."""
    plan = result.plan
    table = Table(title=f"{len(result.allocator_step_peaks_bytes)} measured and {result.steps} "
                        f"timed steps compiled under activation_memory_budget="
                        f"{plan.activation_memory_budget:g}, the head "
                        f"{_head(plan.head_chunks)}", title_justify="left")
    for name in ("", "compiled, planned", "eager, unplanned", "budget / held / predicted"):
        table.add_column(name, justify="left" if not name else "right")
    within = result.allocator_peak_bytes <= plan.budget_bytes
    table.add_row("peak (allocator)",
                  Text(format_bytes(result.allocator_peak_bytes),
                       style="green" if within else "bold red"),
                  format_bytes(max(result.baseline_allocator_step_peaks_bytes)),
                  f"{format_bytes(plan.budget_bytes)} / {format_bytes(plan.bound_peak_bytes)} / "
                  f"{format_bytes(plan.predicted_peak_bytes)}")
    table.add_row(f"steps 1-{len(result.allocator_step_peaks_bytes)}",
                  "\n".join(format_bytes(p) for p in result.allocator_step_peaks_bytes),
                  "\n".join(format_bytes(p) for p in result.baseline_allocator_step_peaks_bytes),
                  optimizer_state_note(workload))
    table.add_row("step time", f"{result.step_s * 1e3:.2f} ms",
                  f"{result.baseline_step_s * 1e3:.2f} ms",
                  f"{result.step_s / result.baseline_step_s:.2f}x measured")
    table.add_row("gradients", "match" if result.gradients_match else
                  Text("DIFFER", style="bold red"), "",
                  f"step 1 within {result.gradients_rtol:g} of the largest")
    console.print(table)
    console.print(Text(f"peak (allocator), against which the budget is checked: "
                       f"{result.allocator_source}; step time: the median of the timed steps",
                       style="dim"))
