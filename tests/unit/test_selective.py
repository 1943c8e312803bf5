"""Selective recomputation's options against brute force over every subset of a block's ops."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from memprop.plan.selective import front, options, rerun_peak
from memprop.trace.stages import BlockOp


def _ops(rng: random.Random, n: int) -> list[BlockOp]:
    ops = []
    for i in range(n):
        allocates = rng.random() < 0.85
        ops.append(BlockOp(op=f"aten.op{i % 3}.default", occurrence=i // 3,
                           cache_bytes=rng.choice((0, rng.randint(1, 40))),
                           allocates=allocates, flops=rng.choice((0, rng.randint(1, 50))),
                           moved_bytes=rng.randint(0, 30), rise_bytes=rng.randint(0, 60)))
    return ops


def _cost(op: BlockOp) -> float:
    return float(op.flops + op.moved_bytes)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 10))
def test_front_is_the_brute_force_pareto_front(seed: int, n: int) -> None:
    ops = _ops(random.Random(seed), n)
    # A view or an in-place op has nothing to keep; an output written in place later in the
    # block (allocates False, though it holds bytes) cannot be handed back unchanged.
    keepable = [o for o in ops if o.allocates]
    best: dict[int, float] = {}  # the most saving at exactly these bytes, over all subsets
    for size in range(len(keepable) + 1):
        for subset in itertools.combinations(keepable, size):
            kept = sum(o.cache_bytes for o in subset)
            saved = sum(_cost(o) for o in subset)
            best[kept] = max(best.get(kept, -1.0), saved)
    expected, most = [], -1.0
    for kept in sorted(best):  # the Pareto front: more bytes only where it saves more
        if best[kept] > most:
            expected.append((kept, best[kept]))
            most = best[kept]
    points = front(ops, _cost)
    assert [(b, v) for b, v, _ in points] == expected
    for kept_bytes, saved, keys in points:  # each point's keys are what it claims
        chosen = [o for o in keepable if (o.op, o.occurrence) in keys]
        assert sum(o.cache_bytes for o in chosen) == kept_bytes
        assert sum(_cost(o) for o in chosen) == saved


def test_options_are_spread_below_the_tape_and_bounded_by_the_forward() -> None:
    ops = _ops(random.Random(7), 14)
    tape = sum(o.cache_bytes for o in ops) // 2
    found = options(ops, _cost, tape_bytes=tape, forward_peak_bytes=0, forward_cost=60.0,
                    limit=4)
    assert 1 <= len(found) <= 4
    assert all(o.cache_bytes < tape and 0 < o.saved_cost <= 60.0 for o in found)
    assert [o.cache_bytes for o in found] == sorted({o.cache_bytes for o in found})


def test_rerun_peak_adds_the_outputs_kept_from_later_ops() -> None:
    def op(i: int, cache: int, rise: int) -> BlockOp:
        return BlockOp(op="aten.mm.default", occurrence=i, cache_bytes=cache, allocates=True,
                       flops=1, moved_bytes=0, rise_bytes=rise)

    ops = [op(0, 10, 50), op(1, 20, 40), op(2, 30, 45)]
    # Keeping op 2's output: it is live from the start, 30 bytes above ops 0 and 1's rises.
    assert rerun_peak(ops, frozenset({("aten.mm.default", 2)}), 0) == 80
    assert rerun_peak(ops, frozenset({("aten.mm.default", 0)}), 0) == 50
    assert rerun_peak(ops, frozenset(), 99) == 99
