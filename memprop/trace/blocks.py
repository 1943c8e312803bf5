"""The blocks of a model: the run of module calls through which the activation flows.

NOTE [ What a run of blocks is ]
From the calls of a traced forward (``memprop.trace.calls``), the candidates are the calls of
modules that are items of an ``nn.Sequential`` or an ``nn.ModuleList``, containers themselves
excepted (their items are candidates in their place, so nested Sequentials such as a ResNet's
``layer1`` .. ``layer4`` flatten into one run). Call ``d`` follows call ``c`` when ``d`` starts
after ``c`` stops and ``d``'s first tensor argument is ``c``'s first tensor output, the same
storage: the activation flows from one block into the next, whatever else they receive
(attention masks, rotary tables, held as constants) and whoever calls them (an
``nn.Sequential``'s forward, a Python loop over an ``nn.ModuleList``). Of the calls that could
follow ``c``, the one that starts first follows it (a block's own first sub-layer also reads its
input, and starts later). A run is a maximal chain of such calls, each module called once;
what runs before its first block is the prefix (embeddings, a stem), what runs after its last
is the suffix (pooling, a head, a loss computed in the forward).

When several runs qualify, the one whose blocks save the most for backward is the run: the
memory checkpointing can act on. A run can be named instead: ``blocks="transformer.h"`` takes
the items of that container, which must form one run.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from memprop.errors import UsageError
from memprop.trace.calls import CONTAINERS, Call
from memprop.trace.ledger import Category
from memprop.units import format_bytes

__all__ = ["BlockRun", "find_run", "runs", "why_none"]


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockRun:
    """The chosen run: the calls of its blocks, in order, and what was chosen over."""

    calls: tuple[Call, ...]
    saved_bytes: int
    """What the blocks' own ops save for backward, summed: the run's weight in the choice."""
    others: tuple[str, ...]
    """The other runs found, described, for the report."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(call.name for call in self.calls)

    def describe(self) -> str:
        return describe(self.calls)


def describe(calls: Sequence[Call]) -> str:
    """``transformer.h.0 .. transformer.h.11 (12 GPT2Block)``."""
    kinds = sorted({type(c.module).__name__ for c in calls})
    kind = kinds[0] if len(kinds) == 1 else "blocks"
    if len(calls) == 1:
        return f"{calls[0].name} (1 {kind})"
    return f"{calls[0].name} .. {calls[-1].name} ({len(calls)} {kind})"


def _candidates(calls: Sequence[Call]) -> list[Call]:
    return [c for c in calls if c.container is not None and not isinstance(c.module, CONTAINERS)
            and c.main_input is not None and c.main_output is not None]


class _SavedBytes:
    """Bytes saved in any range of ticks, from prefix sums over the saves sorted by birth: a
    call's own saves in logarithmic time, so that weighing every block is linear in depth."""

    def __init__(self, saved: Sequence[tuple[int, int]]) -> None:
        ordered = sorted(saved)
        self.births = [born for born, _ in ordered]
        self.totals = [0, *itertools.accumulate(size for _, size in ordered)]

    def of(self, call: Call) -> int:
        """What ``call`` saves: the saves born in its ticks ``start+1..stop``."""
        low = bisect.bisect_right(self.births, call.start)
        high = bisect.bisect_right(self.births, call.stop)
        return self.totals[high] - self.totals[low] if high > low else 0


def runs(calls: Sequence[Call]) -> list[list[Call]]:
    """Every maximal run of candidate calls through which the activation flows (NOTE above)."""
    candidates = _candidates(calls)
    by_input: dict[int, list[Call]] = {}
    for call in candidates:
        by_input.setdefault(call.main_input.index, []).append(call)  # type: ignore[union-attr]
    follower: dict[int, Call] = {}
    for call in candidates:
        after = [d for d in by_input.get(call.main_output.index, [])  # type: ignore[union-attr]
                 if d.start >= call.stop and d is not call]
        if after:
            follower[call.index] = min(after, key=lambda d: (d.start, d.depth))
    followed = {d.index for d in follower.values()}
    found = []
    for head in candidates:
        if head.index in followed:
            continue
        run, seen = [head], {id(head.module)}
        while run[-1].index in follower:
            nxt = follower[run[-1].index]
            if id(nxt.module) in seen:
                break  # a module called twice in the run: one wrapper cannot tell the calls apart
            run.append(nxt)
            seen.add(id(nxt.module))
        found.append(run)
    return found


def find_run(calls: Sequence[Call], records: Sequence[object], model: nn.Module,
             named: str | None = None) -> BlockRun | None:
    """The run of blocks of a traced forward (NOTE [ What a run of blocks is ]); None when the
    model has none. ``records`` are the ledger's records, to weigh the runs by what their blocks
    save; ``named`` takes the items of that container instead."""
    saved = [(r.born, r.bytes) for r in records  # type: ignore[attr-defined]
             if r.saved and r.saved_in_phase == "forward"  # type: ignore[attr-defined]
             and r.category is Category.SAVED_ACTIVATIONS]  # type: ignore[attr-defined]
    found = runs(calls)
    own_saved = _SavedBytes(saved)

    def weight(run: list[Call]) -> int:
        return sum(own_saved.of(c) for c in run)

    if named is not None:
        return _named(found, calls, model, named, weight)
    qualified = sorted(found, key=lambda r: (-weight(r), -len(r)))
    if not qualified:
        return None
    best = qualified[0]
    others = tuple(f"{describe(r)}, saving {format_bytes(weight(r))}" for r in qualified[1:4])
    return BlockRun(calls=tuple(best), saved_bytes=weight(best), others=others)


def _named(found: list[list[Call]], calls: Sequence[Call], model: nn.Module, named: str,
           weight: object) -> BlockRun:
    container = dict(model.named_modules()).get(named)
    if not isinstance(container, CONTAINERS):
        containers = [n for n, m in model.named_modules() if isinstance(m, CONTAINERS) and n]
        raise UsageError(f"the blocks' container {named!r} is not an nn.Sequential or "
                         f"nn.ModuleList of "
                         f"{type(model).__name__}: its containers are "
                         f"{', '.join(containers[:12]) or 'none'}")
    members = {id(m) for m in container.modules() if m is not container}
    inside = [[c for c in run if id(c.module) in members] for run in found]
    inside = [run for run in inside if run]
    if len(inside) != 1:
        called = sum(1 for c in calls if id(c.module) in members and c.container is not None)
        raise UsageError(
            f"the items of {named} do not form one run through which the activation flows "
            f"({called} calls, in {len(inside)} runs): each block must take the previous "
            "block's output as its first argument"
        )
    run = inside[0]
    return BlockRun(calls=tuple(run), saved_bytes=weight(run), others=())  # type: ignore[operator]


def why_none(calls: Sequence[Call], model: nn.Module) -> str:
    """Why a model has no run of blocks, with what was found, for the error."""
    containers = [f"{n} ({type(m).__name__} of {len(m)})" for n, m in model.named_modules()
                  if isinstance(m, CONTAINERS) and n]
    found = [describe(r) for r in runs(calls)]
    seen = f"runs of one block: {', '.join(found[:6])}" if found else "no items called in turn"
    return (f"memprop plans a run of blocks through which the activation flows "
            f"(nn.Sequential children, or nn.ModuleList items called in a loop), and "
            f"{type(model).__name__} has none: its containers are "
            f"{', '.join(containers[:8]) or 'none'}; {seen}. Put the blocks in an "
            "nn.Sequential or nn.ModuleList, or name the container (--blocks NAME, blocks=...)")
