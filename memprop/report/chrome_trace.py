"""A profile as a Chrome trace / Perfetto JSON (the Trace Event Format's JSON object form).

The clock is the ledger's op clock, not time: one op tick is drawn as one microsecond, so the
viewers' time axis reads in ticks. Events:

- ``C`` (counter) ``live bytes`` at every tick, one argument per category: Perfetto draws a
  track per category, chrome://tracing a stacked chart;
- ``X`` (complete) spans: the phases (thread 1), each module's run at every level of nesting
  (thread 2: ``layers`` above ``layers.0`` above ``layers.0.linear``), and every op (thread 3);
- ``i`` (instant) at the training peak; ``M`` metadata naming the process and the threads.

Events are sorted by timestamp (metadata first), and at one timestamp a longer span comes
before the spans it contains, as the viewers expect for nesting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memprop.report.output import write_output
from memprop.trace.profile import Profile

__all__ = ["trace_events", "write_trace"]

_PID = 1
_PHASES_TID, _MODULES_TID, _OPS_TID = 1, 2, 3


def write_trace(path: str | Path, profile: Profile) -> str:
    """Write the profile's trace to ``path`` (``write_output``'s rules: ``-`` is standard output,
    a regular file is replaced whole); return how to name the destination."""
    document = {
        "traceEvents": trace_events(profile),
        "displayTimeUnit": "ms",
        "otherData": {"tool": "memprop", "version": profile.tool.get("version", ""),
                      "clock": "op ticks of the training step, one tick drawn as 1 µs",
                      "workload": str(profile.workload.get("name", ""))},
    }
    return write_output(path, json.dumps(document) + "\n")


def trace_events(profile: Profile) -> list[dict[str, Any]]:
    """The ``traceEvents`` list, sorted."""
    timeline = profile.timeline
    n = len(timeline.phases)
    metadata: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": _PID, "tid": 0, "ts": 0,
         "args": {"name": f"memprop: {profile.workload.get('name', '')}"}},
    ]
    for tid, name in ((_PHASES_TID, "phases"), (_MODULES_TID, "modules"), (_OPS_TID, "ops")):
        metadata.append({"name": "thread_name", "ph": "M", "pid": _PID, "tid": tid, "ts": 0,
                         "args": {"name": name}})
        metadata.append({"name": "thread_sort_index", "ph": "M", "pid": _PID, "tid": tid,
                         "ts": 0, "args": {"sort_index": tid}})
    events: list[dict[str, Any]] = []
    for tick in range(n):
        events.append({"name": "live bytes", "ph": "C", "pid": _PID, "tid": 0, "ts": tick,
                       "args": {c: curve[tick] for c, curve in timeline.curves.items()}})
        events.append({"name": timeline.ops[tick], "cat": "op", "ph": "X", "pid": _PID,
                       "tid": _OPS_TID, "ts": tick, "dur": 1,
                       "args": {"tick": tick, "phase": timeline.phases[tick],
                                "module": timeline.modules[tick],
                                "live_bytes": sum(c[tick] for c in timeline.curves.values())}})
    for name, start, stop in _runs(list(timeline.phases)):
        events.append({"name": name, "cat": "phase", "ph": "X", "pid": _PID,
                       "tid": _PHASES_TID, "ts": start, "dur": stop - start})
    for name, start, stop in _module_runs(list(timeline.modules)):
        events.append({"name": name, "cat": "module", "ph": "X", "pid": _PID,
                       "tid": _MODULES_TID, "ts": start, "dur": stop - start})
    if n:
        events.append({"name": "training peak", "ph": "i", "s": "g", "pid": _PID,
                       "tid": _OPS_TID, "ts": timeline.peak_tick,
                       "args": {"bytes": profile.training_peak_bytes,
                                "breakdown": dict(profile.peak_breakdown)}})
    events.sort(key=lambda e: (e["ts"], -e.get("dur", 0), e["tid"]))
    return metadata + events


def _runs(labels: list[str]) -> list[tuple[str, int, int]]:
    """Maximal runs of equal, non-empty labels: (label, first tick, tick after the last)."""
    runs: list[tuple[str, int, int]] = []
    start = 0
    for tick in range(1, len(labels) + 1):
        if tick == len(labels) or labels[tick] != labels[start]:
            if labels[start]:
                runs.append((labels[start], start, tick))
            start = tick
    return runs


def _module_runs(modules: list[str]) -> list[tuple[str, int, int]]:
    """Runs of every module at every level of nesting: the run of ``a`` contains the runs of
    ``a.b``, because a tick in ``a.b`` is a tick in ``a``."""
    depth = max((m.count(".") + 1 for m in modules if m), default=0)
    runs: list[tuple[str, int, int]] = []
    for level in range(1, depth + 1):
        prefixes = [".".join(m.split(".")[:level]) if m.count(".") + 1 >= level else ""
                    for m in modules]
        runs += _runs(prefixes)
    return runs
