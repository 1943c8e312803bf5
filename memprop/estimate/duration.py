"""How long a deep workload will take to trace, said before it starts.

Tracing costs the same per layer at every depth (the same ops, each recorded once), so two
small depths timed on fake tensors give a line to extrapolate; a user who asks for depth 100000
learns at once that it is hours of work, instead of watching nothing for minutes.

Known limitations: the line is the profile's trace; planning the chain costs more on top, and
a workload whose layers differ along the depth is only roughly a line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from memprop.errors import MemPropError
from memprop.estimate.sweep import Build, trace_fake

__all__ = ["TraceEstimate", "estimate_trace"]

_PROBE_DEPTHS = (4, 8)
"""The two depths timed: small enough to cost a second, deep enough to be past the fixed part
(the prefix, the loss)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TraceEstimate:
    depth: int
    total_s: float
    """The predicted wall time of one fake trace of the whole step at ``depth``."""
    per_layer_s: float
    probe_depths: tuple[int, int]

    def sentence(self) -> str:
        return (f"depth {self.depth}: tracing the step takes about {_duration(self.total_s)} "
                f"here ({self.per_layer_s * 1e3:.1f} ms a layer, timed on fake tensors at depths "
                f"{self.probe_depths[0]} and {self.probe_depths[1]})")


def estimate_trace(build: Build, depth: int, batch_size: int = 1) -> TraceEstimate | None:
    """Time ``build`` traced on fake tensors at two small depths and extrapolate to ``depth``;
    None when the workload does not trace at them (its errors are for the real attempt)."""
    times = []
    for probe in _PROBE_DEPTHS:
        start = time.perf_counter()
        try:
            trace_fake(build, batch_size, probe)
        except MemPropError:
            return None
        times.append(time.perf_counter() - start)
    low, high = _PROBE_DEPTHS
    # The slope, and never less than the deeper probe's average (timing noise can flatten it).
    per_layer = max((times[1] - times[0]) / (high - low), times[1] / high / 2)
    return TraceEstimate(depth=depth, total_s=times[1] + per_layer * (depth - high),
                         per_layer_s=per_layer, probe_depths=_PROBE_DEPTHS)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
