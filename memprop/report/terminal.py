"""Rich terminal reports. Renderers take the console to write to, so tests capture them."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from memprop.trace.profile import Profile
from memprop.units import format_bytes

__all__ = ["render_profile"]

_CATEGORY_ROWS = [
    ("parameters", "parameters_bytes", "the weights"),
    ("buffers", "buffers_bytes", "running statistics and other buffers"),
    ("gradients", "gradients_bytes", "one .grad per trained parameter"),
    ("optimizer_state", "optimizer_state_bytes", "momentum, Adam's moments..."),
    ("inputs", "inputs_bytes", "inputs and targets"),
    ("saved_activations", "saved_activations_bytes", "kept by forward for backward"),
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
    notes = [f"loss: {profile.loss_note}"]
    if profile.measured is not None:
        notes.append(f"measured: {profile.measured.source}")
    notes.append(
        "peak: the most bytes held at once by live tensor storages, each counted once; "
        f"the training peak falls in the {profile.peak_phase} pass"
    )
    for note in notes:
        console.print(Text(note, style="dim"))


def _totals_table(profile: Profile) -> Table:
    memory = profile.memory
    closed = profile.closed_form or {}
    table = Table(title="Where the training step's memory goes", title_justify="left")
    table.add_column("")
    table.add_column("size", justify="right")
    table.add_column("at the peak", justify="right")
    if closed:
        table.add_column("closed form", justify="right")
    table.add_column("what it is", style="dim")
    for category, field, meaning in _CATEGORY_ROWS:
        value = getattr(memory, field)
        if category == "buffers" and value == 0:
            continue
        row = [category.replace("_", " "), format_bytes(value),
               format_bytes(profile.peak_breakdown.get(category, 0))]
        if closed:
            row.append(format_bytes(closed[field]) if field in closed else "")
        table.add_row(*row, meaning)
    temporaries = profile.peak_breakdown.get("temporaries", 0)
    row = ["temporaries", "", format_bytes(temporaries)]
    if closed:
        row.append("")
    table.add_row(*row, "outputs, gradients in flight, scratch")
    if memory.second_order_saved_bytes:
        row = ["second-order graph", format_bytes(memory.second_order_saved_bytes), ""]
        if closed:
            row.append("")
        table.add_row(*row, "saved by backward for a second derivative")
    table.add_section()
    measured = profile.measured
    for label, field, measured_value in (
        ("training peak", "training_peak_bytes",
         None if measured is None else measured.training_peak_bytes),
        ("inference peak", "inference_peak_bytes",
         None if measured is None else measured.inference_peak_bytes),
    ):
        value = getattr(memory, field)
        note = "forward, backward, optimizer step" if label.startswith("training") else \
            "forward under inference_mode, eval()"
        if measured_value is not None:
            note += f"; measured {format_bytes(measured_value)}"
        row = [Text(label, style="bold"), Text(format_bytes(value), style="bold"), ""]
        if closed:
            row.append(format_bytes(closed[field]) if field in closed else "")
        table.add_row(*row, note)
    row = ["training / inference", f"{profile.training_to_inference:.2f}x", ""]
    if closed:
        row.append("")
    table.add_row(*row, "how much more training needs than prediction")
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
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
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
        table.add_column(name, justify="left" if name == "stage" else "right")
    for stage in profile.stages:
        table.add_row(
            stage.name,
            f"{stage.forward_s * 1e3:.2f} ms",
            f"{stage.backward_s * 1e3:.2f} ms",
            f"{stage.flops / 1e9:.3g}",
            format_bytes(stage.input_bytes),
            format_bytes(stage.saved_bytes),
            format_bytes(stage.output_bytes),
        )
    return table
