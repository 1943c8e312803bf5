"""The Chrome trace / Perfetto JSON: the structure the viewers require."""

from __future__ import annotations

import json
from pathlib import Path

import memprop
from memprop.report.chrome_trace import write_trace
from memprop.workload import SeedConfig, seed_workload

_REQUIRED = {"M": {"name", "ph", "pid", "tid", "args"},
             "C": {"name", "ph", "pid", "ts", "args"},
             "X": {"name", "ph", "pid", "tid", "ts", "dur"},
             "i": {"name", "ph", "pid", "tid", "ts", "s"}}


def test_trace_structure(tmp_path: Path) -> None:
    profile = memprop.profile(seed_workload(SeedConfig(input_dim=16, hidden=32, classes=4,
                                                       depth=2, batch=8)))
    document = json.loads(Path(write_trace(tmp_path / "t.json", profile)).read_text())
    events = document["traceEvents"]
    for event in events:
        assert _REQUIRED[event["ph"]] <= set(event), event
    stamps = [e["ts"] for e in events if e["ph"] != "M"]
    assert stamps == sorted(stamps)
    timeline = profile.timeline
    n = len(timeline.phases)
    counters = [e for e in events if e["ph"] == "C"]
    assert [c["ts"] for c in counters] == list(range(n))
    for counter in counters:
        assert counter["args"] == {k: v[counter["ts"]] for k, v in timeline.curves.items()}
    assert max(sum(c["args"].values()) for c in counters) == profile.training_peak_bytes
    ops = [e for e in events if e["ph"] == "X" and e["cat"] == "op"]
    assert [o["name"] for o in ops] == list(timeline.ops)
    phases = {e["name"]: (e["ts"], e["dur"]) for e in events if e.get("cat") == "phase"}
    assert phases["forward"] == (1, timeline.forward_end)
    assert phases["backward"] == (timeline.forward_end + 1,
                                  timeline.backward_end - timeline.forward_end)
    modules = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "module"]
    assert ("layers.0", 1, 3) in modules and ("layers.0.linear", 1, 2) in modules
    # spans on one thread nest: each either contains or is disjoint from the others
    for name, start, stop in modules:
        for other, s2, e2 in modules:
            assert stop <= s2 or e2 <= start or (start <= s2 and e2 <= stop) or (
                s2 <= start and stop <= e2), (name, other)
    peak = [e for e in events if e["ph"] == "i"]
    assert peak[0]["ts"] == timeline.peak_tick
    assert peak[0]["args"]["bytes"] == profile.training_peak_bytes
