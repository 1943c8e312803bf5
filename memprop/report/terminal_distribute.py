"""The rich report of ``memprop distribute``."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from memprop.distribute import Distribution
from memprop.distribute.strategies import REGISTRY
from memprop.units import format_bytes

__all__ = ["render_distribution"]


def render_distribution(result: Distribution, console: Console) -> None:
    """Every candidate (per-rank peak predicted and measured, step time, fits), the chosen
    one first in bold, then why the others lose."""
    budget = "no budget" if result.budget_bytes is None else \
        f"a budget of {format_bytes(result.budget_bytes)} per rank"
    table = Table(title=f"A step of batch {result.batch_size} on up to {result.devices} "
                        f"device(s), {budget}", title_justify="left")
    ran = any(c.measured_step_s is not None for c in result.candidates)
    names = ["candidate", "rank peak", "step"] + (
        ["measured peak", "allocator peak", "measured step"] if ran else []) + ["fits"]
    for name in names:
        # The description wraps; the figures never do.
        table.add_column(name, justify="left" if name in ("candidate", "fits") else "right",
                         no_wrap=name != "candidate")
    for index, c in enumerate(result.candidates):
        measured = [r.measured_peak_bytes for r in c.ranks if r.measured_peak_bytes is not None]
        counted = [r.allocator_peak_bytes for r in c.ranks
                   if r.allocator_peak_bytes is not None]
        cells: list[str | Text] = [
            Text(c.describe(), style="bold" if index == result.chosen else ""),
            format_bytes(c.peak_bytes), f"{c.predicted_step_s * 1e3:.1f} ms"]
        if ran:
            cells += [format_bytes(max(measured)) if measured else "—",
                      format_bytes(max(counted)) if counted else "—",
                      "—" if c.measured_step_s is None else f"{c.measured_step_s * 1e3:.1f} ms"]
        cells.append(Text("yes", style="green") if c.fits else Text("no", style="red"))
        table.add_row(*cells)
    console.print(table)
    present = {c.strategy for c in result.candidates}
    how = "; ".join(f"{s.label}: {s.predicted_as}" for name, s in REGISTRY.items()
                    if name in present)
    console.print(Text("rank peak and step: predicted (the highest rank's steady-state peak; "
                       f"{how})"
                       + ("; measured: every rank run, counted by the ledger and by the "
                          "allocator; the step, the fastest of its timed steps on rank 0"
                          if ran else ""),
                       style="dim"))
    for note in result.notes:
        console.print(Text(note, style="dim"))
    chosen = result.candidates[result.chosen]
    console.print(Text(f"chosen: {chosen.describe()}", style="bold"))
    for c in result.candidates:
        if c.why:
            console.print(Text(f"{c.describe()}: {c.why}", style="dim"))
    console.print(Text(f"step time: {result.step_time or 'the roofline'}; microbatches in "
                       f"turn; {result.communication}", style="dim"))
