"""A traced step's ledger extended to more blocks: the middle block's segments of the clock
repeated, every storage born in one copied with it (NOTE [ Identical blocks traced once ] in
``memprop.trace.repeated``)."""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from memprop.trace.block_clocks import Bounds
from memprop.trace.ledger import StorageLedger, StorageRecord

__all__ = ["DEPTHS", "TEMPLATE", "NotRepeating", "extended_ledger", "extended_tick",
           "same_ledger"]

DEPTHS = (2, 3, 4)
"""The depths traced: the ledger is built from 3 (one middle block), its figures outside the
blocks checked linear over all three, the construction checked against 4."""
TEMPLATE = 3
"""The depth whose ledger is extended: one middle block, between the first and the last."""
_MIDDLE = 1


class NotRepeating(Exception):
    """The traced depths are not one block repeated: the model is traced in full."""


@dataclass(frozen=True, slots=True)
class _Segment:
    kind: str
    """H: before the blocks (tick 0 on); P: a block's forward; M: after the blocks' forwards
    until the backward reaches the last block; Q: a block's backward; E: the rest, or until
    the optimizer's step reaches the first block; O: its updates of a block; Z: the rest."""
    block: int | None
    lo: int
    hi: int
    """Ticks ``lo+1..hi``."""


def _segments(bounds: Bounds, depth: int, clock: int) -> list[_Segment]:
    if sorted(bounds.starts) != list(range(depth)) or sorted(bounds.stops) != list(range(depth)):
        raise NotRepeating("not every block ran once in the forward")
    starts = [bounds.starts[j] for j in range(depth)]
    cuts = [_Segment("H", None, -1, starts[0])]
    for j in range(depth):
        cuts.append(_Segment("P", j, starts[j], starts[j + 1] if j + 1 < depth
                             else bounds.stops[depth - 1]))
    if not bounds.outputs and bounds.first_input is None:
        cuts.append(_Segment("M", None, cuts[-1].hi, clock))
    else:
        if sorted(bounds.outputs) != list(range(depth)):
            raise NotRepeating("the backward did not reach every block")
        # A first block fed by the inputs themselves has no node behind it: its backward runs
        # to the end (the first block is copied once, whatever its segment holds).
        first_input = bounds.first_input
        if first_input is None:
            first_input = bounds.updates.get(0, clock)
        cuts.append(_Segment("M", None, cuts[-1].hi, bounds.outputs[depth - 1]))
        for j in reversed(range(depth)):
            cuts.append(_Segment("Q", j, bounds.outputs[j],
                                 bounds.outputs[j - 1] if j else first_input))
        if not bounds.updates:
            cuts.append(_Segment("E", None, first_input, clock))
        else:
            if sorted(bounds.updates) != list(range(depth)):
                raise NotRepeating("the optimizer did not update every block")
            updates = [bounds.updates[j] for j in range(depth)]
            cuts.append(_Segment("E", None, first_input, updates[0]))
            end = clock if bounds.updated is None else bounds.updated
            for j in range(depth):
                cuts.append(_Segment("O", j, updates[j], updates[j + 1] if j + 1 < depth
                                     else end))
            cuts.append(_Segment("Z", None, end, clock))
    for before, after in itertools.pairwise(cuts):
        if after.lo != before.hi or after.hi < after.lo:
            raise NotRepeating("the blocks' forwards or backwards overlap")
    return cuts


def _source(block: int, depth: int, template: int) -> int:
    """The template's block that target block ``block`` copies: the first, the last, or the
    middle one."""
    if block == 0:
        return 0
    return template - 1 if block == depth - 1 else _MIDDLE


class _Layout:
    """The target's segments, each a copy of a template segment, and the map of ticks."""

    def __init__(self, segments: list[_Segment], template: int, depth: int) -> None:
        self.segments = segments
        self.template = template
        self.depth = depth
        self._his = [s.hi for s in segments]
        by_key = {(s.kind, s.block): i for i, s in enumerate(segments)}
        order: list[tuple[str, int | None]] = [("H", None)]
        order += [("P", c) for c in range(depth)]
        order += [("M", None)]
        if ("Q", 0) in by_key:
            order += [("Q", c) for c in reversed(range(depth))] + [("E", None)]
        if ("O", 0) in by_key:
            order += [("O", c) for c in range(depth)] + [("Z", None)]
        self.targets: list[tuple[str, int | None, int, int]] = []
        """(kind, target block, template segment, target lo) in the target's order."""
        self.lo: dict[tuple[str, int | None], int] = {}
        self.length: dict[tuple[str, int | None], int] = {}
        lo = -1
        for kind, block in order:
            source = by_key[(kind, None if block is None else _source(block, depth, template))]
            self.targets.append((kind, block, source, lo))
            self.lo[(kind, block)] = lo
            self.length[(kind, block)] = segments[source].hi - segments[source].lo
            lo += self.length[(kind, block)]
        self.clock = lo

    def segment_of(self, tick: int) -> int:
        return bisect.bisect_left(self._his, tick)

    def block_for(self, block: int, context: tuple[int, int] | None) -> int:
        """The target block that template block ``block`` becomes, seen from a storage born in
        template block ``context[0]`` copied to target block ``context[1]`` (offsets between
        blocks kept), or from outside the blocks (the first and last stay first and last)."""
        if context is not None:
            found = context[1] + block - context[0]
        elif block == self.template - 1:
            found = self.depth - 1
        else:
            found = block
        if not 0 <= found < self.depth:
            raise NotRepeating("a storage outlives the blocks it would be copied to")
        return found

    def tick(self, tick: int, context: tuple[int, int] | None) -> int:
        """The target's tick of template tick ``tick`` (``context``: see ``block_for``)."""
        segment = self.segments[self.segment_of(tick)]
        block = None if segment.block is None else self.block_for(segment.block, context)
        offset = tick - segment.lo
        if offset > self.length[(segment.kind, block)]:
            raise NotRepeating("a block's storage dies where its copy's block has no tick")
        return self.lo[(segment.kind, block)] + offset


class _Names:
    """Renames what the template's blocks are called to what their copies are."""

    def __init__(self, block_name: Callable[[int], str]) -> None:
        self.block_name = block_name
        self.prefixes = [block_name(j) for j in range(TEMPLATE)]

    def block_of(self, name: str) -> tuple[int, str] | None:
        for j, prefix in enumerate(self.prefixes):
            if name == prefix or name.startswith(prefix + "."):
                return j, name[len(prefix):]
        return None

    def rename(self, name: str, layout: _Layout, context: tuple[int, int] | None) -> str:
        found = self.block_of(name)
        if found is None:
            return name
        block, rest = found
        return self.block_name(layout.block_for(block, context)) + rest

    def normalized(self, name: str) -> str:
        found = self.block_of(name)
        return name if found is None else "#" + found[1]


def _leading(records: Sequence[StorageRecord]) -> int:
    """How many records were registered before the first op (born at tick 0)."""
    return next((i for i, r in enumerate(records) if r.born > 0), len(records))


def _key(record: StorageRecord, names: _Names) -> tuple[Any, ...]:
    return (record.bytes, record.category, record.op, tuple(record.shape), record.dtype,
            record.phase, record.saved, record.saved_in_phase, record.freed,
            names.normalized(record.module))


def _copy(record: StorageRecord, index: int, born: int, freed: int | None, module: str
          ) -> StorageRecord:
    copied = StorageRecord(index, record.bytes, born, record.category, record.op, module,
                           record.shape, record.dtype, record.phase)
    copied.freed = freed
    copied.saved = record.saved
    copied.saved_in_phase = record.saved_in_phase
    return copied


def extended_ledger(template: StorageLedger, smaller: StorageLedger, bounds: Bounds,
                    block_name: Callable[[int], str], depth: int) -> StorageLedger:
    """The ledger of ``depth`` blocks, built from the ``TEMPLATE``'s (``bounds``: where its
    blocks ran); ``smaller`` (one block fewer) says what one more block registers before the
    step. ``block_name(i)``: the qualified name of the ``i``-th block."""
    names = _Names(block_name)
    layout = _Layout(_segments(bounds, TEMPLATE, template.clock), TEMPLATE, depth)
    records = template.records
    lead = _leading(records)
    smaller_lead = Counter(_key(r, names) for r in smaller.records[:_leading(smaller.records)])
    extra: list[StorageRecord] = []
    for record in records[:lead]:
        key = _key(record, names)
        if smaller_lead[key]:
            smaller_lead[key] -= 1
        else:
            extra.append(record)
    if +smaller_lead or any(r.freed is not None for r in extra):
        raise NotRepeating("what one more block registers before the step is not one block's")
    out = list(records[:lead])
    for copy in range(depth - TEMPLATE):
        for record in extra:
            found = names.block_of(record.module)
            module = record.module if found is None else (
                block_name(TEMPLATE + copy) + found[1])
            out.append(_copy(record, len(out), 0, None, module))
    # Every later record goes with the segment that was running when it was appended.
    anchored: dict[int, list[StorageRecord]] = {}
    latest = 0
    for record in records[lead:]:
        latest = max(latest, record.born)
        anchored.setdefault(layout.segment_of(latest), []).append(record)
    ticks = [template.ticks[0]]
    flops: dict[int, int] = {}
    for kind, block, source, lo in layout.targets:
        segment = layout.segments[source]
        context = None if block is None or segment.block is None else (segment.block, block)
        for tick in range(max(segment.lo + 1, 1), segment.hi + 1):
            op, module, phase = template.ticks[tick]
            ticks.append((op, names.rename(module, layout, context), phase))
            if tick in template.tick_flops:
                flops[lo + tick - segment.lo] = template.tick_flops[tick]
        if 0 in template.tick_flops and kind == "H":
            flops[0] = template.tick_flops[0]
        for record in anchored.get(source, ()):
            born = (lo + record.born - segment.lo if segment.lo < record.born <= segment.hi
                    else layout.tick(record.born, context))
            freed = None if record.freed is None else layout.tick(record.freed, context)
            out.append(_copy(record, len(out), born, freed,
                             names.rename(record.module, layout, context)))
    if len(ticks) != layout.clock + 1:
        raise NotRepeating("the blocks' segments do not tile the clock")
    return StorageLedger.from_records(out, ticks, flops, seen_cuda=template._seen_cuda)


def same_ledger(built: StorageLedger, traced: StorageLedger,
                block_name: Callable[[int], str]) -> bool:
    """Whether two ledgers record the same step: every tick, every record after the first op;
    what was registered before it, as a multiset (the order of one block's parameters among
    the registrations is not copied)."""
    names = _Names(block_name)
    if built.ticks != traced.ticks or built.tick_flops != traced.tick_flops:
        return False
    lead, traced_lead = _leading(built.records), _leading(traced.records)
    if lead != traced_lead or len(built.records) != len(traced.records):
        return False
    if Counter(_key(r, names) for r in built.records[:lead]) != Counter(
            _key(r, names) for r in traced.records[:lead]):
        return False
    return all((*_key(a, names)[:-1], a.index, a.born, a.module)
               == (*_key(b, names)[:-1], b.index, b.born, b.module)
               for a, b in zip(built.records[lead:], traced.records[lead:], strict=True))


def extended_tick(bounds: Bounds, clock: int, depth: int, tick: int) -> int:
    """Where tick ``tick`` of the ``TEMPLATE``'s step (``clock`` ticks long), outside the
    blocks, falls in the step of ``depth`` blocks."""
    return _Layout(_segments(bounds, TEMPLATE, clock), TEMPLATE, depth).tick(tick, None)
