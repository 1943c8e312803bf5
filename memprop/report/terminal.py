"""Rich terminal reports. Renderers take the console to write to, so tests capture them."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from memprop.estimate import FitResult, Sweep, SweepCell
from memprop.trace.profile import Profile
from memprop.units import format_bytes

__all__ = ["render_fit", "render_profile", "render_sweep"]

_CATEGORY_ROWS = [
    ("parameters", "parameters_bytes"),
    ("buffers", "buffers_bytes"),
    ("gradients", "gradients_bytes"),
    ("optimizer_state", "optimizer_state_bytes"),
    ("inputs", "inputs_bytes"),
    ("saved_activations", "saved_activations_bytes"),
]


def _workload_line(profile: Profile) -> str:
    w = profile.workload
    parts = [str(w["name"])]
    if w.get("batch_size") is not None:
        parts.append(f"batch {w['batch_size']}")
    if w.get("depth") is not None:
        parts.append(f"depth {w['depth']}")
    parts += [str(w["dtype"]), str(w["device"]), f"{w['mode']} tensors"]
    return " · ".join(parts)


def render_profile(profile: Profile, console: Console, *, top: int = 12) -> None:
    """The totals, the saved-tensor ledger (largest first) and the stage table."""
    console.print(Text(f"memprop profile: {_workload_line(profile)}", style="bold"))
    console.print(_totals_table(profile))
    console.print(_ledger_table(profile, top))
    if profile.stages:
        console.print(_stage_table(profile))
    notes = [
        "saved activations: what forward keeps for backward; gradients: every .grad; "
        "temporaries: outputs and gradients in flight",
        f"loss: {profile.loss_note}",
        profile.blocks_note,
        _steady_state_note(profile),
        # How the step was traced, then what measured is, then how far it strays (the notes
        # memprop.trace.profile writes about it start with "measured ").
        *[note for note in profile.notes if not note.startswith("measured ")],
        *([f"measured: {profile.measured.source}"] if profile.measured is not None else []),
        *[note for note in profile.notes if note.startswith("measured ")],
    ]
    if profile.stages and profile.workload.get("mode") == "fake":
        notes.append("stage times: none on fake tensors (nothing is computed); the planner "
                     "prices stages by their FLOPs and bytes moved")
    notes.append(
        "peak: the most bytes held at once by live tensor storages, each counted once; "
        f"the training peak falls in the {profile.peak_phase} pass{_peak_moment(profile)}"
    )
    for note in notes:
        console.print(Text(note, style="dim"))


def _peak_moment(profile: Profile) -> str:
    """Which op's outputs make the training peak, so that the "at the peak" column can be
    read (gradients at 0 B in a backward pass: the peak came before any was made)."""
    peak = profile.timeline.peak_op()
    if peak["op"] is None:
        return ""
    return (f", just after {peak['op']}" + (f" in {peak['module']}" if peak["module"] else "")
            + f" (op tick {peak['tick']} of {peak['last_tick']})")


def _steady_state_note(profile: Profile) -> str:
    if profile.workload.get("set_to_none", True):
        loop = ("zero_grad(set_to_none=True) between steps (torch's default; "
                "--no-set-to-none if your loop keeps gradients as zeros)")
    else:
        loop = "zero_grad(set_to_none=False): gradients kept, as zeros, through every step"
    first = profile.first_step_peak_bytes
    if first is None:
        started = "the optimizer's state was already made, so the first step was not traced"
    elif first > profile.training_peak_bytes:
        started = (f"the first step peaks higher, at {format_bytes(first)} (its optimizer makes "
                   "its state): a budget must cover it")
    else:
        started = f"the first step peaks at {format_bytes(first)}"
    state = ("the optimizer's state live" if profile.memory.optimizer_state_bytes
             else "no optimizer state (none given, or one that keeps none)")
    return f"training peak: a steady-state step, {state}; {loop}; {started}"


def _totals_table(profile: Profile) -> Table:
    memory = profile.memory
    closed = profile.closed_form or {}
    measured = profile.measured
    table = Table(title="Where the training step's memory goes", title_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("size", justify="right", overflow="fold")
    table.add_column("at the peak", justify="right", overflow="fold")
    if closed:
        table.add_column("closed form", justify="right", overflow="fold")
    if measured is not None:
        table.add_column("measured", justify="right", overflow="fold")

    def row(label: str | Text, size: str | Text, at_peak: str, field: str | None,
            measured_bytes: int | None = None) -> None:
        cells: list[str | Text] = [label, size, at_peak]
        if closed:
            cells.append(format_bytes(closed[field]) if field in closed else "")
        if measured is not None:
            cells.append("" if measured_bytes is None else format_bytes(measured_bytes))
        table.add_row(*cells)

    for category, field in _CATEGORY_ROWS:
        value = getattr(memory, field)
        if category == "buffers" and value == 0:
            continue
        row(category.replace("_", " "), format_bytes(value),
            format_bytes(profile.peak_breakdown.get(category, 0)), field)
    row("temporaries", "", format_bytes(profile.peak_breakdown.get("temporaries", 0)), None)
    if memory.second_order_saved_bytes:
        row("second-order graph", format_bytes(memory.second_order_saved_bytes), "", None)
    table.add_section()
    row(Text("training peak", style="bold"),
        Text(format_bytes(memory.training_peak_bytes), style="bold"), "",
        "training_peak_bytes", None if measured is None else measured.training_peak_bytes)
    first = memory.first_step_peak_bytes
    if first is not None and first != memory.training_peak_bytes:
        row("first step's peak", format_bytes(first), "", "first_step_peak_bytes")
    row(Text("inference peak", style="bold"),
        Text(format_bytes(memory.inference_peak_bytes), style="bold"), "",
        "inference_peak_bytes", None if measured is None else measured.inference_peak_bytes)
    ratio = f"{profile.training_to_inference:.2f}x"
    row("training / inference", ratio, "", None)
    return table


def _lifetime(born: int, freed: int | None) -> str:
    return f"{born} → {freed}" if freed is not None else f"{born} → end"


def _ledger_table(profile: Profile, top: int) -> Table:
    saved = profile.saved_tensors
    table = Table(
        title=f"Saved for backward: {len(saved)} storages, "
        f"{format_bytes(profile.saved_activations_bytes)} (largest first; lifetime in op ticks)",
        title_justify="left",
    )
    for name, justify in (("module", "left"), ("op", "left"), ("shape", "left"),
                          ("dtype", "left"), ("size", "right"), ("lifetime", "right")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for tensor in saved[:top]:
        table.add_row(tensor.module or "(loss)", tensor.op, "×".join(map(str, tensor.shape)) or
                      "scalar", tensor.dtype, format_bytes(tensor.bytes),
                      _lifetime(tensor.born, tensor.freed))
    if len(saved) > top:
        rest = saved[top:]
        table.add_row(f"… {len(rest)} more", "", "", "",
                      format_bytes(sum(t.bytes for t in rest)), "")
    return table


def _stage_table(profile: Profile) -> Table:
    table = Table(title="Stages (the chain the planner sees)", title_justify="left")
    for name in ("stage", "forward", "backward", "GFLOP fwd", "input", "saved", "output"):
        table.add_column(name, justify="left" if name == "stage" else "right", overflow="fold")
    timed = profile.workload.get("mode") != "fake"

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.2f} ms" if timed else "—"

    for stage in profile.stages:
        table.add_row(
            stage.name,
            ms(stage.forward_s),
            ms(stage.backward_s),
            f"{stage.flops / 1e9:.3g}",
            format_bytes(stage.input_bytes),
            format_bytes(stage.saved_bytes),
            format_bytes(stage.output_bytes),
        )
    return table


# Sweeps and fits (memprop.estimate): imported here, not above, so that this block is
# self-contained; memprop.estimate imports nothing from report/.


def _depth_label(depth: int | None) -> str:
    return "—" if depth is None else str(depth)


def _sweep_cell_text(cell: SweepCell) -> Text:
    if cell.status == "ok" and cell.training_peak_bytes is not None:
        text = Text(format_bytes(cell.training_peak_bytes), style="bold")
        text.append(f"\n{format_bytes(cell.inference_peak_bytes or 0)} inf")
        if cell.ratio is not None:
            text.append(f" · {cell.ratio:.1f}x", style="dim")
        return text
    return Text(cell.status, style="red" if cell.status == "error" else "yellow")


def render_sweep(sweep: Sweep, console: Console) -> None:
    """The grid (depth rows × batch columns: training peak, inference peak, their ratio), the
    fitted line per depth beside the closed form, and the cells that failed."""
    w = sweep.workload
    console.print(Text(
        f"memprop sweep: {w.get('name', '?')} · {w.get('dtype', '?')} · {w.get('device', '?')} · "
        f"{sweep.mode} tensors · {len(sweep.cells)} cells in {sweep.wall_s:.1f} s",
        style="bold"))
    grid = Table(title="Training peak (bold), inference peak and their ratio, per cell",
                 title_justify="left", show_lines=True)
    grid.add_column("depth \\ batch", justify="right", overflow="fold")
    for batch in sweep.batch_sizes:
        grid.add_column(str(batch), justify="right", overflow="fold")
    for depth in sweep.depths:
        grid.add_row(_depth_label(depth),
                     *(_sweep_cell_text(sweep.cell(b, depth)) for b in sweep.batch_sizes))
    console.print(grid)
    fits = sweep.line_fits()
    has_closed = any(f.closed_form_training is not None for f in fits)
    lines = Table(title="Training peak = fixed + per example × batch (least squares per depth)",
                  title_justify="left")
    for name in ("depth", "fixed", "per example", "max residual"):
        lines.add_column(name, justify="right", overflow="fold")
    if has_closed:
        lines.add_column("closed form: fixed", justify="right", overflow="fold")
        lines.add_column("per example", justify="right", overflow="fold")
        lines.add_column("cells = closed form", justify="right", overflow="fold")
    lines.add_column("inference per example", justify="right", overflow="fold")
    for depth_fit in fits:
        line = depth_fit.training
        if line is None:
            continue
        row = [_depth_label(depth_fit.depth), format_bytes(round(line.fixed_bytes)),
               format_bytes(round(line.per_example_bytes)),
               f"{line.max_residual_bytes:,.0f} B"]
        if has_closed:
            closed = depth_fit.closed_form_training
            cells = [c for c in sweep.cells if c.depth == depth_fit.depth and c.status == "ok"]
            same = sum(c.training_peak_bytes == c.closed_form_training_peak_bytes for c in cells)
            row += ["", "", ""] if closed is None else [
                format_bytes(round(closed.fixed_bytes)),
                format_bytes(round(closed.per_example_bytes)), f"{same}/{len(cells)}"]
        inference = depth_fit.inference
        row.append("" if inference is None else format_bytes(round(inference.per_example_bytes)))
        lines.add_row(*row)
    if lines.row_count:
        console.print(lines)
        if any(f.training is not None and f.training.max_residual_bytes for f in fits):
            console.print(Text(
                "a non-zero residual: the training peak is not one line over these batch "
                "sizes; its moment (peak_tick in --json) changes as the batch grows, so the "
                "peak is the largest of several lines. Fit the large batches alone to "
                "extrapolate.", style="dim"))
    for cell in sweep.cells:
        if cell.status != "ok":
            console.print(Text(f"batch {cell.batch_size}, depth {_depth_label(cell.depth)}: "
                               f"{cell.status}: {cell.message}",
                               style="red" if cell.status == "error" else "yellow"))


def render_fit(result: FitResult, console: Console) -> None:
    """The largest batch, its peak and headroom, the budget and where it came from."""
    w = result.workload
    console.print(Text(
        f"memprop fit: {w.get('name', '?')}"
        + (f" · depth {w['depth']}" if w.get("depth") is not None else "")
        + f" · {w.get('dtype', '?')} · {w.get('device', '?')}", style="bold"))
    console.print(f"budget: {format_bytes(result.budget_bytes)} ({result.budget_bytes:,} bytes),"
                  f" {result.budget_source}")
    table = Table(title_justify="left", show_header=False)
    table.add_column("")
    table.add_column("", justify="right", overflow="fold")
    table.add_column("", style="dim")
    table.add_row(Text("largest batch that fits", style="bold"),
                  Text(str(result.max_batch_size), style="bold"),
                  f"found with {len(result.probes)} fake traces in {result.wall_s:.1f} s")
    table.add_row("its training peak", format_bytes(result.training_peak_bytes),
                  f"{result.training_peak_bytes:,} bytes")
    table.add_row("headroom", format_bytes(result.headroom_bytes),
                  f"{result.headroom_bytes:,} bytes left under the budget")
    table.add_row(f"batch {result.max_batch_size + 1}",
                  format_bytes(result.next_training_peak_bytes),
                  f"over the budget by {result.next_training_peak_bytes - result.budget_bytes:,}"
                  " bytes")
    checkpointed = result.max_batch_size_with_checkpointing
    table.add_row("with activation checkpointing",
                  "—" if checkpointed is None else str(checkpointed),
                  result.checkpointing_note
                  + ("" if result.checkpointing_compute_overhead is None else
                     f"; extra compute {result.checkpointing_compute_overhead:.0%}"))
    console.print(table)
    if result.smallest_batch_note:
        console.print(Text(result.smallest_batch_note, style="dim"))
    verification = result.verification
    if verification is not None:
        verdict = "fits" if verification.fits else "DOES NOT FIT"
        measured = "" if verification.measured_peak_bytes is None else \
            f"; the device measured {format_bytes(verification.measured_peak_bytes)}"
        agree = "equal to" if verification.training_peak_bytes == \
            verification.predicted_training_peak_bytes else "unlike"
        console.print(Text(
            f"real run of batch {verification.batch_size}: {verdict}, training peak "
            f"{format_bytes(verification.training_peak_bytes)} ({agree} the fake trace's"
            f"){measured}", style="green" if verification.fits else "red"))
