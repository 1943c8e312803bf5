"""A traced chain's statistics extended to more blocks: the middle block's stage repeated, every
other figure linear in depth (NOTE [ Identical blocks traced once ] in
``memprop.trace.repeated``)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from memprop.trace.extend import DEPTHS, TEMPLATE, NotRepeating
from memprop.trace.ledger import Category, StorageLedger
from memprop.trace.stages import ChainCosts, StageStats
from memprop.units import format_bytes

__all__ = ["extended_chain", "linear", "run_weight"]


def linear(values: Sequence[Any], depth: int, what: str) -> Any:
    """The value at ``depth`` of a figure traced at ``DEPTHS``: equal at each, or exactly
    linear in depth (tuples and statistics figure by figure)."""
    first, *rest = values
    if all(v == first for v in rest):
        return first
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        steps = {b - a for a, b in itertools.pairwise(values)}
        if len(steps) != 1:
            raise NotRepeating(f"{what} is not linear in depth")
        return values[-1] + (depth - DEPTHS[-1]) * steps.pop()
    if all(isinstance(v, tuple) and len(v) == len(first) for v in values):
        return tuple(linear([v[i] for v in values], depth, what) for i in range(len(first)))
    if all(isinstance(v, StageStats) for v in values):
        return dataclasses.replace(first, **{
            f.name: linear([getattr(v, f.name) for v in values], depth, f"{what}'s {f.name}")
            for f in dataclasses.fields(StageStats) if f.name not in _TIMED})
    raise NotRepeating(f"{what} changes with depth")


_TIMED = ("forward_s", "backward_s", "name", "index")
"""Stage fields not extended: times (the template's are kept), and what names the stage."""


def run_weight(ledger: StorageLedger, calls: dict[str, tuple[int, int]],
                names: Sequence[str]) -> int:
    """What the run's blocks save for backward, as ``memprop.trace.blocks`` weighs a run: the
    storages saved in the forward and born within each block's call."""
    spans = [calls[n] for n in names if n in calls]
    if len(spans) != len(names):
        raise NotRepeating("a block of the run was not seen")
    return sum(r.bytes for r in ledger.records
               if r.saved and r.saved_in_phase == "forward"
               and r.category is Category.SAVED_ACTIVATIONS
               and any(start < r.born <= stop for start, stop in spans))


def _chain_names(block_name: Callable[[int], str], template: int, depth: int,
                 names: Sequence[str]) -> tuple[int, list[str]]:
    """Where the template's blocks sit among ``names`` (the chain's stages or blocks), and the
    names at ``depth``."""
    ours = [block_name(j) for j in range(template)]
    where = [i for i, n in enumerate(names) if n in ours]
    if not where or [names[i] for i in where] != ours \
            or where != list(range(where[0], where[0] + template)):
        raise NotRepeating("the planner's blocks are not the repeated ones")
    at = where[0]
    return at, [*names[:at], *(block_name(c) for c in range(depth)),
                *names[at + template:]]


def _stages(chains: Sequence[ChainCosts], block_name: Callable[[int], str], depth: int
            ) -> tuple[StageStats, ...]:
    """The stages at ``depth`` from the chains traced at ``DEPTHS``: the middle block's
    repeated (the next depth's middle blocks must be it), the first and last blocks linear in
    depth, the stages around the blocks the same at every depth."""
    roles = []
    for k, chain in zip(DEPTHS, chains, strict=True):
        at, _ = _chain_names(block_name, k, k, [s.name for s in chain.stages])
        stages = chain.stages
        roles.append((stages[:at], stages[at], stages[at + 1:at + k - 1], stages[at + k - 1],
                      stages[at + k:]))
    middle = roles[1][2][0]
    if any(_untimed([s]) != _untimed([middle]) for s in roles[2][2]):
        raise NotRepeating("the middle block's statistics, repeated, are not the next depth's")
    template = roles[1]
    before = [_same([r[0][i] for r in roles], "a stage before the blocks")
              for i in range(len(template[0]))]
    first, last = (linear([r[role] for r in roles], depth, "a block's statistics")
                   for role in (1, 3))
    after = [_same([r[4][i] for r in roles], "a stage after the blocks")
             for i in range(len(template[4]))]
    blocks = [first, *([middle] * (depth - 2)), last]
    grown = [*before, *(dataclasses.replace(s, name=block_name(c))
                        for c, s in enumerate(blocks)), *after]
    return tuple(dataclasses.replace(s, index=i) for i, s in enumerate(grown))


def _same(stages: Sequence[StageStats], what: str) -> StageStats:
    """A stage outside the blocks, which must not change with depth (its times aside)."""
    if any(_untimed([s]) != _untimed(stages[:1]) for s in stages[1:]):
        raise NotRepeating(f"{what} changes with depth")
    return stages[0]


def _untimed(stages: Sequence[StageStats]) -> list[StageStats]:
    """The stages without their times, names and positions: what must repeat."""
    return [dataclasses.replace(s, **{f: type(getattr(s, f))() for f in _TIMED})
            for s in stages]


def _description(model: nn.Module, blocks: Sequence[str], saved_bytes: int) -> str:
    from memprop.trace.blocks import describe
    from memprop.trace.calls import Call

    modules = dict(model.named_modules())
    calls = [Call(index=i, name=n, module=modules[n], container=None, depth=0, start=0)
             for i, n in enumerate(blocks)]
    return f"{describe(calls)}, saving {format_bytes(saved_bytes)} for backward"


def extended_chain(chains: Sequence[ChainCosts | None], weights: Sequence[int],
                   block_name: Callable[[int], str], model: nn.Module, depth: int
                   ) -> ChainCosts | None:
    """The chain at ``depth`` from the chains traced at ``DEPTHS`` (``weights``: what their
    runs' blocks save, as ``memprop.trace.blocks`` weighs a run); None without one."""
    if all(c is None for c in chains):
        return None
    if any(c is None for c in chains):
        raise NotRepeating("the chain of blocks is found at some depths only")
    template = chains[1]
    assert template is not None
    _, blocks = _chain_names(block_name, TEMPLATE, depth, template.blocks)
    for k, chain, weight in zip(DEPTHS, chains, weights, strict=True):
        assert chain is not None
        _, names = _chain_names(block_name, TEMPLATE, k, template.blocks)
        if chain.blocks_found != _description(model, names, weight):
            raise NotRepeating("the run of blocks is not described as it is traced")
    figures = {f.name: linear([getattr(c, f.name) for c in chains], depth, f.name)
               for f in dataclasses.fields(ChainCosts)
               if f.name not in ("stages", "blocks", "blocks_found")}
    return ChainCosts(
        **figures,
        stages=_stages(chains, block_name, depth),  # type: ignore[arg-type]
        blocks=tuple(blocks),
        blocks_found=_description(model, blocks, linear(weights, depth, "the run's weight")),
    )
