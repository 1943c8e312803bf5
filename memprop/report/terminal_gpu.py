"""The GPU's layers of memory, side by side, each gap explained (``memprop.devices.reconcile``)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from memprop.devices.reconcile import Layer
from memprop.units import format_bytes

__all__ = ["render_reconciliation"]


def render_reconciliation(layers: Sequence[Layer], console: Console, *,
                          title: str = "GPU memory, layer by layer") -> None:
    """One row per layer (its bytes, the gap to the layer before and why), then the advice
    that applies. Prints nothing for no layers."""
    if not layers:
        return
    table = Table(title=title, title_justify="left")
    table.add_column("layer", justify="left")
    table.add_column("bytes", justify="right")
    table.add_column("gap", justify="right")
    table.add_column("why", justify="left")
    for index, layer in enumerate(layers):
        if index == 0:
            table.add_row(layer.name, format_bytes(layer.bytes), "", layer.explanation)
        else:
            # Past the first layer an explanation opens with its signed gap: a column here.
            head, separator, tail = layer.explanation.partition(": ")
            gap = ("+" if layer.gap_bytes >= 0 else "") + format_bytes(layer.gap_bytes)
            table.add_row(layer.name, format_bytes(layer.bytes), gap,
                          tail if separator else head)
    console.print(table)
    for layer in layers:
        if layer.advice:
            console.print(Text(f"advice: {layer.advice}", style="yellow"))
