"""One self-contained HTML file per profile: nothing fetched, it opens offline.

The page is rendered from the profile's JSON document (``Profile.to_dict(timeline=True)``), and
that document is embedded in the page (``<script type="application/json" id="memprop-data">``):
every figure shown carries ``data-field`` (its path in the document) and ``data-bytes`` (its
value), so a test can hold each visible number to the JSON's. Inline CSS, an inline SVG chart of
live bytes by category over the step's op ticks, and a few lines of inline script for the
chart's hover read-out; without script the page loses only the read-out.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

from memprop.report.output import write_output
from memprop.trace.profile import Profile
from memprop.units import format_bytes

__all__ = ["CATEGORY_COLORS", "render_html", "write_html"]

CATEGORY_COLORS = {
    "parameters": "#4e79a7",
    "buffers": "#9c755f",
    "gradients": "#f28e2b",
    "optimizer_state": "#e15759",
    "inputs": "#76b7b2",
    "saved_activations": "#59a14f",
    "temporaries": "#edc948",
}
_LEDGER_ROWS = 200
_WIDTH, _HEIGHT = 1040, 380
_LEFT, _RIGHT, _TOP, _BOTTOM = 84, 16, 34, 40

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1100px;padding:0 16px;color:#1d2433;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#5b6475;margin:0 0 16px}
table{border-collapse:collapse;margin:4px 0 8px}
th,td{padding:3px 10px;border-bottom:1px solid #e3e6ec;text-align:left;vertical-align:top}
th{background:#f4f6f9;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:700;border-top:2px solid #c9ced8}.dim{color:#6b7385}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;
vertical-align:-1px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:8px 0 4px}
.card{border:1px solid #e3e6ec;border-radius:8px;padding:8px 14px;min-width:150px}
.card b{display:block;font-size:20px}.card span{color:#5b6475;font-size:12px}
#readout{min-height:20px;color:#1d2433;font-size:13px;font-variant-numeric:tabular-nums}
.legend{display:flex;gap:14px;flex-wrap:wrap;font-size:13px;margin:2px 0 6px}
svg text{font:11px system-ui,sans-serif;fill:#3a4252}
"""

_SCRIPT = """
(function(){
var doc=JSON.parse(document.getElementById('memprop-data').textContent);
var t=doc.timeline, svg=document.getElementById('chart'), out=document.getElementById('readout');
if(!t||!svg||!out)return;
var n=t.phases.length, g=svg.dataset, left=+g.left, width=+g.plotWidth;
function fmt(b){var u=['B','KiB','MiB','GiB','TiB'],i=0,v=b;
while(v>=1024&&i<4){v/=1024;i++;}return i?(v>=100?v.toPrecision(3):v.toFixed(2))+' '+u[i]:b+' B';}
svg.addEventListener('mousemove',function(e){
var r=svg.getBoundingClientRect(), x=(e.clientX-r.left)*svg.viewBox.baseVal.width/r.width;
var k=Math.floor((x-left)/width*n); if(k<0||k>=n){out.textContent='';return;}
var parts=[], total=0;
for(var c in t.curves){var v=t.curves[c][k]; total+=v;
if(v)parts.push(c.replace('_',' ')+' '+fmt(v));}
out.textContent='tick '+k+' · '+t.phases[k]+' · '+t.ops[k]+(t.modules[k]?' in '+t.modules[k]:'')
+' · live '+fmt(total)+' = '+parts.join(' + ');});
svg.addEventListener('mouseleave',function(){out.textContent='';});
})();
"""


def write_html(path: str | Path, profile: Profile) -> str:
    """Write the profile's HTML report to ``path`` (``write_output``'s rules: ``-`` is standard
    output, a regular file is replaced whole); return how to name the destination."""
    return write_output(path, render_html(profile.to_dict(timeline=True)))


def render_html(document: dict[str, Any]) -> str:
    """The page for a profile document that carries its ``timeline``."""
    w = document["workload"]
    title = f"memprop profile: {w['name']}"
    size = " · ".join(
        [f"batch {w['batch_size']}"] * (w.get("batch_size") is not None)
        + [f"depth {w['depth']}"] * (w.get("depth") is not None)
        + [str(w["dtype"]), str(w["device"]), f"{w['mode']} tensors"]
    )
    device = document.get("device", {})
    data = json.dumps(document).replace("<", "\\u003c").replace(">", "\\u003e")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">{escape(size)} · {escape(str(device.get("name", "")))} · '
        f'memprop {escape(str(document["tool"]["version"]))}</p>',
        _cards(document),
        "<h2>Memory over the training step</h2>",
        _chart(document),
        "<h2>Where the training step's memory goes</h2>",
        _totals(document),
        _ledger(document),
        _stages(document),
        f'<p class="dim">loss: {escape(str(document.get("loss", "")))}. Peak: the most bytes '
        "held at once by live tensor storages, each storage counted once.</p>",
        _notes(document),
        f'<script type="application/json" id="memprop-data">{data}</script>',
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _notes(document: dict[str, Any]) -> str:
    """What the terminal report says below its tables: how the step was traced, the blocks,
    and the allocator's measured peaks beside what they are."""
    notes = [escape(note) for note in (document.get("blocks_note"), *document.get("notes", ()))
             if note and not note.startswith("measured ")]
    measured = document.get("measured")
    if measured is not None:
        notes.append(
            "measured: training peak "
            f"{_figure('measured.training_peak_bytes', measured['training_peak_bytes'])}, "
            "inference peak "
            f"{_figure('measured.inference_peak_bytes', measured['inference_peak_bytes'])}; "
            f"{escape(measured['source'])}")
    notes += [escape(note) for note in document.get("notes", ()) if note.startswith("measured ")]
    return '<ul class="dim">' + "".join(f"<li>{note}</li>" for note in notes) + "</ul>"


def _figure(field: str, value: int, tag: str = "span", attrs: str = "") -> str:
    """A visible number tied to its path in the document."""
    return (f'<{tag}{attrs} data-field="{escape(field)}" data-bytes="{value}">'
            f"{escape(format_bytes(value))}</{tag}>")


def _cards(document: dict[str, Any]) -> str:
    memory = document["memory"]
    training, inference = memory["training_peak_bytes"], memory["inference_peak_bytes"]
    ratio = training / max(1, inference)
    cards = [
        ("training peak", _figure("memory.training_peak_bytes", training, "b"),
         f"in the {escape(document['peak']['phase'])} pass"),
        ("inference peak", _figure("memory.inference_peak_bytes", inference, "b"),
         "forward under inference_mode"),
        ("saved for backward", _figure("memory.saved_activations_bytes",
                                       memory["saved_activations_bytes"], "b"),
         f"{len(document['saved_tensors'])} storages"),
        ("training / inference", f"<b>{ratio:.2f}x</b>", "the cost of learning"),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><span>{label}</span>{value}<span>{note}</span></div>'
        for label, value, note in cards) + "</div>"


_TOTAL_ROWS = [
    ("parameters", "parameters_bytes", "the weights"),
    ("buffers", "buffers_bytes", "running statistics and other buffers"),
    ("gradients", "gradients_bytes", "one .grad per trained parameter"),
    ("optimizer_state", "optimizer_state_bytes", "momentum, Adam's moments..."),
    ("inputs", "inputs_bytes", "inputs and targets"),
    ("saved_activations", "saved_activations_bytes", "kept by forward for backward"),
]


def _swatch(category: str) -> str:
    color = CATEGORY_COLORS.get(category, "#999")
    return f'<span class="swatch" style="background:{color}"></span>'


def _totals(document: dict[str, Any]) -> str:
    memory, breakdown = document["memory"], document["peak"]["breakdown"]
    closed = document.get("closed_form") or {}
    head = "<th></th><th class=n>size</th><th class=n>at the peak</th>"
    head += "<th class=n>closed form</th>" if closed else ""
    rows = [f"<table><tr>{head}<th>what it is</th></tr>"]

    def closed_cell(field: str) -> str:
        if not closed:
            return ""
        return "<td class=n>" + (_figure(f"closed_form.{field}", closed[field])
                                 if field in closed else "") + "</td>"

    for category, field, meaning in _TOTAL_ROWS:
        if category == "buffers" and memory[field] == 0:
            continue
        rows.append(
            f"<tr><td>{_swatch(category)}{category.replace('_', ' ')}</td>"
            f"<td class=n>{_figure(f'memory.{field}', memory[field])}</td>"
            f"<td class=n>{_figure(f'peak.breakdown.{category}', breakdown.get(category, 0))}"
            f"</td>{closed_cell(field)}<td class=dim>{meaning}</td></tr>")
    rows.append(
        f"<tr><td>{_swatch('temporaries')}temporaries</td><td></td><td class=n>"
        f"{_figure('peak.breakdown.temporaries', breakdown.get('temporaries', 0))}</td>"
        f"{'<td></td>' if closed else ''}<td class=dim>outputs, gradients in flight, scratch"
        "</td></tr>")
    for label, field, note in (
        ("training peak", "training_peak_bytes", "forward, backward, optimizer step"),
        ("inference peak", "inference_peak_bytes", "forward under inference_mode, eval()"),
    ):
        rows.append(f'<tr class="total"><td>{label}</td>'
                    f"<td class=n>{_figure(f'memory.{field}', memory[field])}</td><td></td>"
                    f"{closed_cell(field)}<td class=dim>{note}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _ledger(document: dict[str, Any]) -> str:
    saved = document["saved_tensors"]
    total = document["memory"]["saved_activations_bytes"]
    rows = [f"<h2>Saved for backward: {len(saved)} storages, "
            f"{_figure('memory.saved_activations_bytes', total)}</h2>",
            '<p class="dim">Largest first; lifetime in op ticks of the training step.</p>',
            "<table><tr><th>module</th><th>op</th><th>shape</th><th>dtype</th>"
            "<th class=n>size</th><th class=n>born</th><th class=n>freed</th></tr>"]
    for index, tensor in enumerate(saved[:_LEDGER_ROWS]):
        shape = "×".join(map(str, tensor["shape"])) or "scalar"
        freed = "end" if tensor["freed"] is None else tensor["freed"]
        rows.append(
            f"<tr><td>{escape(tensor['module'] or '(loss)')}</td><td>{escape(tensor['op'])}</td>"
            f"<td>{shape}</td><td>{escape(tensor['dtype'])}</td>"
            f"<td class=n>{_figure(f'saved_tensors.{index}.bytes', tensor['bytes'])}</td>"
            f"<td class=n>{tensor['born']}</td><td class=n>{freed}</td></tr>")
    if len(saved) > _LEDGER_ROWS:
        rest = sum(t["bytes"] for t in saved[_LEDGER_ROWS:])
        rows.append(f"<tr><td colspan=4>… {len(saved) - _LEDGER_ROWS} more</td>"
                    f"<td class=n>{escape(format_bytes(rest))}</td><td></td><td></td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _stages(document: dict[str, Any]) -> str:
    stages = document.get("stages") or []
    if not stages:
        return ""
    rows = ["<h2>Stages (the chain the planner sees)</h2>",
            "<table><tr><th>stage</th><th class=n>forward</th><th class=n>backward</th>"
            "<th class=n>GFLOP fwd</th><th class=n>input</th><th class=n>saved</th>"
            "<th class=n>output</th></tr>"]
    for index, stage in enumerate(stages):
        figures = "".join(
            f"<td class=n>{_figure(f'stages.{index}.{field}', stage[field])}</td>"
            for field in ("input_bytes", "saved_bytes", "output_bytes"))
        rows.append(
            f"<tr><td>{escape(stage['name'])}</td><td class=n>{stage['forward_s'] * 1e3:.2f} ms"
            f"</td><td class=n>{stage['backward_s'] * 1e3:.2f} ms</td>"
            f"<td class=n>{stage['flops'] / 1e9:.3g}</td>{figures}</tr>")
    rows.append("</table>")
    return "".join(rows)


def _nice_ticks(largest: int) -> list[int]:
    """Gridline values at a round step (1, 2, 2.5 or 5 × 10^k of a binary unit) up to
    ``largest``."""
    if largest <= 0:
        return [0]
    unit = 1
    while largest / unit >= 1024 and unit < 1024**4:
        unit *= 1024
    raw = largest / unit / 5
    scale = 10 ** math.floor(math.log10(raw))
    step = next(m * scale for m in (1, 2, 2.5, 5, 10) if m * scale >= raw) * unit
    count = int(largest // step)
    return [round(i * step) for i in range(count + 1)]


def _chart(document: dict[str, Any]) -> str:
    """Stacked step areas of live bytes per category over the op ticks, the phase boundaries
    and the peak marked."""
    timeline = document["timeline"]
    curves: dict[str, list[int]] = timeline["curves"]
    n = len(timeline["phases"])
    if n == 0:
        return '<p class="dim">No ticks were recorded.</p>'
    totals = [sum(curve[t] for curve in curves.values()) for t in range(n)]
    top = max(totals) * 1.1 or 1
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM

    def x(tick: float) -> float:
        return _LEFT + tick * plot_w / n

    def y(value: float) -> float:
        return _TOP + plot_h * (1 - value / top)

    svg = [f'<svg id="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" width="100%" role="img" '
           f'data-left="{_LEFT}" data-plot-width="{plot_w}" '
           f'aria-label="live bytes by category over the training step">']
    for value in _nice_ticks(max(totals)):
        svg.append(f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y(value):.1f}" '
                   f'y2="{y(value):.1f}" stroke="#e3e6ec"/>'
                   f'<text x="{_LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                   f"{escape(format_bytes(round(value)))}</text>")
    lower = [0] * n
    legend = []
    for category, curve in curves.items():
        if not any(curve):
            continue
        upper = [low + value for low, value in zip(lower, curve, strict=True)]
        points = []
        for t in range(n):
            points += [f"{x(t):.2f},{y(upper[t]):.2f}", f"{x(t + 1):.2f},{y(upper[t]):.2f}"]
        for t in range(n - 1, -1, -1):
            points += [f"{x(t + 1):.2f},{y(lower[t]):.2f}", f"{x(t):.2f},{y(lower[t]):.2f}"]
        color = CATEGORY_COLORS.get(category, "#999")
        svg.append(f'<polygon class="area" data-category="{category}" fill="{color}" '
                   f'fill-opacity="0.9" stroke="none" points="{" ".join(points)}"/>')
        legend.append(f"<span>{_swatch(category)}{category.replace('_', ' ')}</span>")
        lower = upper
    bounds = [(0.0, "setup")]
    forward_end, backward_end = timeline["forward_end"], timeline["backward_end"]
    bounds += [(1.0, "forward"), (forward_end + 1, "backward"), (backward_end + 1, "optimizer")]
    edges = [start for start, _ in bounds[1:]] + [float(n)]
    for (start, label), end in zip(bounds[1:], edges[1:], strict=True):
        if end <= start:
            continue
        svg.append(f'<line x1="{x(start):.1f}" x2="{x(start):.1f}" y1="{_TOP - 14}" '
                   f'y2="{_TOP + plot_h}" stroke="#3a4252" stroke-dasharray="4 3"/>'
                   f'<text x="{x((start + end) / 2):.1f}" y="{_TOP - 18}" text-anchor="middle" '
                   f'font-weight="600">{label}</text>')
    peak_tick = timeline["peak_tick"]
    peak = document["memory"]["training_peak_bytes"]
    px, py = x(peak_tick + 0.5), y(totals[peak_tick])
    anchor = "end" if px > _LEFT + plot_w * 0.6 else "start"
    dx = -10 if anchor == "end" else 10
    op = timeline["ops"][peak_tick]
    svg.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="#c0392b" stroke="#fff" '
               f'stroke-width="1.5"/><text x="{px + dx:.1f}" y="{py - 8:.1f}" '
               f'text-anchor="{anchor}" font-weight="700" fill="#c0392b" style="fill:#c0392b">'
               f'peak {_figure("memory.training_peak_bytes", peak, "tspan")} at tick {peak_tick} '
               f"({escape(op)})</text>")
    svg.append(f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{_TOP + plot_h}" '
               f'y2="{_TOP + plot_h}" stroke="#3a4252"/>'
               f'<text x="{_LEFT + plot_w / 2:.1f}" y="{_HEIGHT - 8}" text-anchor="middle">'
               f"op ticks of the training step (0 … {n - 1})</text>")
    svg.append("</svg>")
    return (f'<div class="legend">{"".join(legend)}</div>' + "".join(svg)
            + '<div id="readout"></div>')
