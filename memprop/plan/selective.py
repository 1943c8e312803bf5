"""Selective recomputation: which of a block's op outputs to keep when the block is
checkpointed, so that its re-run costs less.

A checkpointed block keeps only its input and recomputes its whole forward when the backward
reaches it. Under ``torch.utils.checkpoint``'s selective policy
(``create_selective_checkpoint_contexts``) it may also keep some op outputs from the first run
(held until its re-run, then used instead of running the op again): more memory, less
recomputation. Keeping an output costs its storage's bytes and saves that op's cost; with every
other op re-run whatever is kept (memprop turns checkpoint's early stop off), costs and savings
add up, and the best choices for each amount of memory are a 0/1 knapsack, solved here exactly
as its Pareto front: for each memory, the most recomputation it can save. A few points of the
front become the block's options (:class:`Option`), among which the planner chooses
(``memprop.plan._dp``) beside keeping the whole tape and recomputing all of it.

The Llama-style block this was first measured on keeps 20.5 MiB plain and 0.75 MiB under full
recomputation; keeping its matmul and attention outputs holds 11-12 MiB and re-runs only its
pointwise work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memprop.trace.stages import BlockOp

__all__ = ["MAX_OPTIONS", "Option", "front", "options"]

MAX_OPTIONS = 8
"""Options per block handed to the planner: points of the Pareto front, spread over its
memory."""
MAX_FRONT = 50_000
"""Points the exact front may hold before it is thinned (never reached by the models tried)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Option:
    """One selective recomputation of a block: the op outputs it keeps."""

    cache_bytes: int
    """What the kept outputs hold from the block's first run to its re-run."""
    saved_cost: float
    """The recomputation it saves, in the chain's cost unit."""
    rerun_peak_bytes: int
    """The re-run's forward transient (``Stage.forward_peak_bytes`` for this option): the kept
    outputs are live from its start, not born along the way."""
    keep: tuple[tuple[str, int], ...]
    """The kept ops, by (aten op, which call of it in the block's forward)."""


def front(ops: Sequence[BlockOp], cost: Callable[[BlockOp], float]
          ) -> list[tuple[int, float, frozenset[tuple[str, int]]]]:
    """The exact Pareto front of (bytes kept, cost saved, ops kept), fewest bytes first, each
    point saving strictly more than the one before. Outputs that hold nothing extra are kept in
    every point (the block's own output is not among the ops: keeping it would hold it until the
    block's re-run, ``memprop.trace.stages``)."""
    keepable = [(op, cost(op)) for op in ops if op.allocates]
    free = frozenset((o.op, o.occurrence) for o, _ in keepable if o.cache_bytes == 0)
    free_saving = sum(c for o, c in keepable if o.cache_bytes == 0)
    points: list[tuple[int, float, frozenset[tuple[str, int]]]] = [(0, free_saving, free)]
    for op, saving in keepable:
        if op.cache_bytes <= 0 or saving <= 0:
            continue
        key = (op.op, op.occurrence)
        grown = [(b + op.cache_bytes, v + saving, k | {key}) for b, v, k in points]
        points = _pareto([*points, *grown])
        if len(points) > MAX_FRONT:
            points = points[:: len(points) // MAX_FRONT + 1]
    return points


def _pareto(points: list[tuple[int, float, frozenset[tuple[str, int]]]]
            ) -> list[tuple[int, float, frozenset[tuple[str, int]]]]:
    points.sort(key=lambda p: (p[0], -p[1]))
    kept: list[tuple[int, float, frozenset[tuple[str, int]]]] = []
    for point in points:
        if not kept or point[1] > kept[-1][1]:
            kept.append(point)
    return kept


def options(ops: Sequence[BlockOp], cost: Callable[[BlockOp], float], *, tape_bytes: int,
            forward_peak_bytes: int, forward_cost: float, overhead: float = 0.0,
            limit: int = MAX_OPTIONS) -> tuple[Option, ...]:
    """Up to ``limit`` points of the front, spread over its memory, as a block's options:
    those that save something net of the policy's ``overhead`` and hold less than the block's
    whole tape (keeping the tape saves everything for no more). No option saves more than the
    block's ``forward_cost`` (its ops' prices, summed in another order, may exceed it by a
    rounding)."""
    points = [(b, v - overhead, k) for b, v, k in front(ops, cost)
              if v > overhead and b < tape_bytes]
    if len(points) > limit:
        step = (len(points) - 1) / (limit - 1)
        points = [points[round(i * step)] for i in range(limit)]
    return tuple(Option(cache_bytes=b, saved_cost=min(v, forward_cost), keep=tuple(sorted(k)),
                        rerun_peak_bytes=rerun_peak(ops, k, forward_peak_bytes))
                 for b, v, k in points)


def rerun_peak(ops: Sequence[BlockOp], keep: frozenset[tuple[str, int]],
               forward_peak_bytes: int) -> int:
    """The forward transient of a re-run that starts with the outputs of ``keep`` live: at each
    op, the plain run's rise plus the kept outputs it would only make later (an upper bound: the
    kept ops' own temporaries are counted though they do not run)."""
    peak, pending = forward_peak_bytes, 0
    for op in reversed(ops):
        peak = max(peak, op.rise_bytes + pending)
        if (op.op, op.occurrence) in keep:
            pending += op.cache_bytes
    return peak
