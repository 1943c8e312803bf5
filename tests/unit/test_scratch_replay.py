"""``memprop.run.scratch``'s replay of the allocator's events: an op's scratch is its peak
above the larger of the live bytes before and after it, by hand."""

from __future__ import annotations

from memprop.run.scratch import MARK_BYTES, _largest, _Marks


def _events(*sizes_by_op: tuple[tuple[int, int], ...]) -> tuple[list[tuple[int, int, int, int]],
                                                                 _Marks]:
    """Events of ops in order, each op's (address, bytes) bracketed by its two markers."""
    marks = _Marks()
    events: list[tuple[int, int, int, int]] = []
    for number, sizes in enumerate(sizes_by_op):
        marks.names.append(f"op{number}")
        for address in (1000 + 2 * number, 1001 + 2 * number):
            marks.addresses.append(address)
        before, after = marks.addresses[-2:]
        events.append((len(events), 0, before, MARK_BYTES))
        events.append((len(events), 0, before, -MARK_BYTES))
        events += [(len(events) + i, 0, address, size) for i, (address, size) in
                   enumerate(sizes)]
        events.append((len(events), 0, after, MARK_BYTES))
        events.append((len(events), 0, after, -MARK_BYTES))
    return events, marks


def test_an_ops_scratch_is_what_it_frees_inside_itself_above_its_outputs() -> None:
    """Oracle, by hand: op0 makes a 10 B output (no scratch); op1 makes a 64 B workspace,
    frees it, and makes a 16 B output (scratch 64); op2 makes a 100 B workspace beside a 40 B
    output (scratch 100); the largest is op2's 100."""
    events, marks = _events(
        ((1, 10),),
        ((2, 64), (2, -64), (3, 16)),
        ((4, 40), (5, 100), (5, -100)),
    )
    scratch = _largest(events, marks)
    assert (scratch.bytes, scratch.op, scratch.ops) == (100, "op2", 3)


def test_outputs_alone_are_no_scratch_and_other_blocks_are_not_markers() -> None:
    """Oracle, by hand: ops that only allocate their outputs (one of MARK_BYTES, at an address
    no marker has) have no scratch; a block freed inside an op after a new one is allocated
    counts, since both were live at once (op1: 64 -> 72 -> 40, 8 above max(64, 40))."""
    events, marks = _events(((1, 32), (2, 32)), ((3, MARK_BYTES),))
    assert (_largest(events, marks).bytes, _largest(events, marks).ops) == (0, 2)
    events, marks = _events(((1, 32), (2, 32)), ((3, 8), (1, -32)))
    assert (_largest(events, marks).bytes, _largest(events, marks).op) == (8, "op1")
