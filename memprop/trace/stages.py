"""Per-stage costs: what the planner needs to know about each link of the chain.

The stages are the blocks of the run ``memprop.trace.blocks`` found, with what runs before the first
block (the prefix) and after the last (the suffix) as two more stages that are always kept.
:func:`chain_costs` measures them on a traced step, from the calls ``memprop.trace.calls``
recorded and the ledger's records.

NOTE [ Whose storage is it ]
A storage belongs to the stage in whose forward it was born. A stage's tape is what autograd
saved of its own storages, plus, for the prefix, whatever it made that is still alive when the
first block starts and that the blocks read (attention masks, rotary tables, position ids:
constants every block receives), counted as held until the prefix's backward: a checkpointed
block keeps what it received until its own backward, and the last block to be differentiated
is the first; this over-states by their size where no block keeps them that long. A storage
born in a stage that outlives the backward (a key/value cache the model returns) is the
stage's *persistent* memory, held from then on whatever the plan; one that nothing saves but
that outlives the stage until the forward returns (the model's own locals) is *held to the
forward's end*. The model's output is the chain's ``x_n``, held by the caller.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from memprop.calibration.rates import Probe
from memprop.trace.ledger import Category, OpEntry, StorageLedger, StorageRecord
from memprop.units import format_bytes

if TYPE_CHECKING:
    from memprop.trace.blocks import BlockRun
    from memprop.trace.calls import Call, CallRecorder

__all__ = ["MAPPED_BYTES", "PREFIX", "SUFFIX", "BlockOp", "ChainCosts", "StageKind", "StageRef",
           "StageStats", "chain_costs"]

_SEEDED = torch.Tag.nondeterministic_seeded

# NOTE [ Storages the CPU maps fresh ]
# torch's CPU allocator asks glibc's malloc, which maps a request at or above its mmap
# threshold fresh from the kernel and unmaps it when freed: every page of it faults and is
# zeroed when first written, at each birth (on this project's 2-core VM, 0.2-0.4 ms per MiB
# beyond its bytes, ~5x a copy of the same bytes). The threshold adapts upwards to the largest
# freed block, up to DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit, glibc's malloc.c), so in a
# training loop smaller storages come back from malloc's free lists, already touched, and
# larger ones are mapped fresh every step: a language model's full logits are, one chunk of
# them is not. MALLOC_MMAP_THRESHOLD_ in the environment fixes the threshold (glibc's
# mallopt). A GPU's caching allocator reuses its blocks: the pricing charges these bytes on a
# CPU only (memprop.plan.costs.mapped_seconds_per_byte).
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
_THRESHOLD = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
MAPPED_BYTES = int(_THRESHOLD) if _THRESHOLD.isdigit() else _GLIBC_MMAP_THRESHOLD_MAX
"""The size from which a CPU storage is mapped fresh at each birth (NOTE [ Storages the CPU
maps fresh ])."""

PREFIX = "(prefix)"
"""The prefix's name in plans and JSON; decode a name with :meth:`StageRef.named`."""
SUFFIX = "(suffix)"
"""The suffix's name in plans and JSON."""

StageKind = Literal["prefix", "block", "suffix"]


@dataclass(frozen=True, slots=True)
class StageRef:
    """Which stage of the chain a name stands for, typed: the prefix, a block or the suffix, and
    the module whose forward runs it. Plans and JSON carry the stage's ``name`` (a block's
    qualified module name, ``(prefix)``, ``(suffix)``); :meth:`named` is the one decoder of it."""

    kind: StageKind
    module: str
    """The module that runs the stage: the block's qualified name (``transformer.h.3``); the
    model itself (``""``) for the prefix and suffix, which run inside its forward."""

    @classmethod
    def named(cls, name: str) -> StageRef:
        """The stage a plan's or a document's stage name stands for."""
        if name == PREFIX:
            return cls(kind="prefix", module="")
        if name == SUFFIX:
            return cls(kind="suffix", module="")
        return cls(kind="block", module=name)

    @property
    def name(self) -> str:
        """The stage's name in plans and JSON (the inverse of :meth:`named`)."""
        return {"prefix": PREFIX, "suffix": SUFFIX}.get(self.kind, self.module)

    @property
    def is_block(self) -> bool:
        return self.kind == "block"


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockOp:
    """One op of a block's forward, as a selective recomputation sees it (``memprop.plan.
    selective``): which call of which op it is, what keeping its output would hold, and what
    recomputing it costs."""

    op: str
    """The aten op, ``aten.mm.default``."""
    occurrence: int
    """Which call of that op within the block's forward, from 0."""
    cache_bytes: int
    """The storages it makes, which keeping its output holds until the block's backward (the
    block's own output weighs 0 here, and is never kept: ``allocates``)."""
    allocates: bool
    """Whether it makes a storage that may be kept: views and in-place ops make none, an
    output that a later op of the block writes in place cannot be handed back unchanged, and the
    block's own output is never kept: a selective checkpoint's cache would hold it until the
    block's re-run, past the next stage's forward where the chain frees it when that stage does
    not save its input (a ViT's first block fed a transposed view saves a contiguous copy)."""
    flops: int
    moved_bytes: int
    probe: Probe | None = None
    """Its call, when it is a pointwise op (``memprop.calibration.rates.Probe``)."""
    elements: int = 0
    """Elements of its output, when it is a pointwise op."""
    rise_bytes: int = 0
    """The highest live total while it ran (ops that selective recomputation ignores, run just
    before it, included), less the live total when the block began: with the outputs kept for
    later ops added, the block's re-run peak under a selective option."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StageStats:
    """One stage of the chain (a block, or the prefix or suffix around the blocks), as one
    traced training step saw it. Bytes are storage bytes, each storage counted once."""

    index: int
    """Position in the chain, from 0."""
    name: str
    """The block's qualified module name (``transformer.h.3``), or ``(prefix)`` and
    ``(suffix)``."""
    forward_s: float
    """Wall-clock seconds of the stage's forward, measured under the tracer."""
    backward_s: float
    """Seconds from the moment autograd reaches the stage's output to the moment it reaches the
    stage's input."""
    flops: int
    """Floating-point operations of the forward (``torch.utils.flop_counter`` formulas)."""
    backward_flops: int
    """Floating-point operations of the backward."""
    input_bytes: int
    """The stage's input activation(s)."""
    output_bytes: int
    """The stage's output activation(s)."""
    saved_bytes: int
    """What the stage's ops save for backward, parameters, buffers and the stage's own input
    excluded (its output included when an op saves it, as ReLU does)."""
    saves_input: bool
    """Whether the stage's backward needs its input (a Linear does; a ReLU alone does not)."""
    saves_output: bool
    """Whether the output's storage is among ``saved_bytes``."""
    forward_peak_bytes: int
    """The highest live total during the stage's forward, less the live total when it began:
    output, saved tensors and the temporaries of the moment."""
    backward_peak_bytes: int
    """The same for the stage's backward, over the live total when it began (which holds the
    gradient of its output)."""
    gradient_bytes: int
    """What the stage's backward leaves alive for later: parameter gradients born there (its
    ``.grad``s, unless they accumulate in place into kept ones), and gradients the autograd
    engine holds until another contribution to the same parameter arrives."""
    persistent_bytes: int = 0
    """Storages born in the stage's forward that outlive the backward (a cache the model
    returns): held from the stage's forward on, whatever the plan."""
    forward_held_bytes: int = 0
    """Storages born in the stage's forward that nothing saves but that outlive it, until the
    forward returns (the model's own locals, such as the embeddings before their sum)."""
    forward_moved_bytes: int = 0
    """Bytes the forward's ops read and wrote (0 unless counted): memory-bound work's price."""
    backward_moved_bytes: int = 0
    """The same for the backward."""
    forward_mapped_bytes: int = 0
    """Storages born in the forward at or above :data:`MAPPED_BYTES`: on a CPU the allocator
    maps them fresh from the kernel, and every page faults and is zeroed when first written
    (NOTE [ Storages the CPU maps fresh ])."""
    backward_mapped_bytes: int = 0
    """The same for the backward."""
    forward_ops: int = 0
    """Ops the forward dispatched (0 unless logged): each costs a launch, whatever its size."""
    backward_ops: int = 0
    """The same for the backward."""
    forward_pointwise: tuple[tuple[Probe, int], ...] = ()
    """The forward's pointwise calls (``memprop.calibration.rates.Probe``) and the elements each
    made, summed by call: what the roofline times on this machine (0 unless logged)."""
    backward_pointwise: tuple[tuple[Probe, int], ...] = ()
    """The same for the backward."""
    pinned: bool = False
    """The prefix and the suffix: always kept, never recomputed."""
    aliases_input: bool = False
    """Whether the stage hands on its input's own storage (an in-place op, a view)."""
    ops: tuple[BlockOp, ...] = ()
    """A block's forward ops, in order (logged steps only): what selective recomputation
    chooses from."""
    draws_random: bool = True
    """Whether the forward draws from a random generator (an op tagged
    ``nondeterministic_seeded``: dropout's ``bernoulli_``, ``native_dropout``, attention with
    dropout), so that a checkpoint of it must keep the generators' state to re-run it the same;
    True when the ops were not logged (unknown)."""

    @property
    def stage(self) -> StageRef:
        """Which stage this is, typed (prefix, block or suffix, and its module)."""
        return StageRef.named(self.name)

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        for working in ("ops", "forward_pointwise", "backward_pointwise"):
            del document[working]  # the planner's working data, not the report's
        return document


@dataclass(frozen=True, kw_only=True, slots=True)
class ChainCosts:
    """What the planner needs beyond the stages: the memory outside the chain."""

    stages: tuple[StageStats, ...]
    fixed_bytes: int
    """Live before the steady-state step began: parameters, buffers, inputs, targets, the
    gradients the loop keeps between steps and the optimizer's state."""
    loss_peak_bytes: int
    """Highest live total between the end of the last stage's forward and the start of its
    backward (the loss's forward and backward), over the live total at that end."""
    loss_residual_bytes: int
    """What the loss left live when the chain's backward starts (the gradient of the output,
    the loss itself...), over the live total at the end of the last stage's forward. The
    model's output is also still held by the caller until the step ends."""
    optimizer_peak_bytes: int
    """The highest live total during the optimizer step (0 without one), of the steady step or
    of the first step, whichever is higher (the first creates the optimizer's state): it does
    not depend on the plan, since every activation is gone by then."""
    traced_peak_bytes: int
    """The traced training peak of the unplanned steady-state step, for calibration checks."""
    blocks: tuple[str, ...] = ()
    """The qualified names of the blocks, in order: where a plan is installed."""
    blocks_found: str = ""
    """The run of blocks, described for the report."""
    other_runs: tuple[str, ...] = ()
    """The other runs that were found and not chosen, described."""
    output_grad_held: bool = False
    """Whether the gradient of the model's output outlives the last stage's backward (when the
    chain's output is the loss itself, that gradient is the seed that
    ``torch.autograd.backward`` holds until the backward is over)."""
    output_grad_bytes: int | None = None
    """The gradient of the model's output as the last stage's backward received it (storage
    bytes); None when it was not seen."""
    first_step_peak_bytes: int | None = None
    """The traced training peak of the loop's first step when it was traced apart from the
    steady one (its forward and backward hold less: no optimizer state yet)."""

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["stages"] = [s.to_dict() for s in self.stages]
        return document


@dataclass(frozen=True, kw_only=True, slots=True)
class _Region:
    """Where a stage runs on the clock, and what flows in and out."""

    stage: StageRef
    forward: tuple[int, int]
    forward_s: float
    inputs: tuple[StorageRecord, ...]
    outputs: tuple[StorageRecord, ...]
    saved: frozenset[int]
    """Indices of the records that the stage's own ops saved."""
    mark: Any
    """When the backward reached the node that made the stage's output (None: never)."""
    pinned: bool


def _regions(run: BlockRun, recorder: CallRecorder, root: Call, forward_started_s: float
             ) -> list[_Region]:
    calls = run.calls
    first, last = calls[0], calls[-1]

    saves = recorder.saves  # in event order: a range of events is a slice (linear in depth)
    events = [event for event, _ in saves]

    def saved_between(low: int, high: int) -> frozenset[int]:
        return frozenset(r.index for _, r in saves[bisect.bisect_right(events, low):
                                                    bisect.bisect_left(events, high)])

    regions = []
    if first.start > 0:
        regions.append(_Region(
            stage=StageRef(kind="prefix", module=""), forward=(0, first.start),
            forward_s=first.started_s - forward_started_s,
            inputs=(), outputs=tuple(first.inputs[:1]), saved=saved_between(0, first.first_event),
            mark=first.input_mark, pinned=True))
    for call in calls:
        regions.append(_Region(
            stage=StageRef(kind="block", module=call.name), forward=(call.start, call.stop),
            forward_s=call.stopped_s - call.started_s, inputs=tuple(call.inputs[:1]),
            outputs=tuple(call.outputs[:1]), saved=saved_between(call.first_event, call.last_event),
            mark=call.output_mark, pinned=False))
    if root.stop > last.stop:
        outputs = tuple(r for r in root.outputs if r.born > last.stop)
        regions.append(_Region(
            stage=StageRef(kind="suffix", module=""), forward=(last.stop, root.stop),
            forward_s=root.stopped_s - last.stopped_s,
            inputs=tuple(last.outputs[:1]), outputs=outputs,
            saved=saved_between(last.last_event, root.last_event), mark=root.output_mark,
            pinned=True))
    else:  # the last block's output is the model's: all of it is the chain's x_n
        regions[-1] = dataclasses.replace(regions[-1], outputs=tuple(root.outputs))
    return regions


def chain_costs(run: BlockRun, recorder: CallRecorder, ledger: StorageLedger, *, root: Call,
                forward_started_s: float, forward_end: int, backward_end: int,
                backward_end_s: float, end: int, has_optimizer: bool,
                backward_end_op: int | None = None) -> ChainCosts | None:
    """The stages of ``run`` and the memory around them, from one traced step (NOTE [ Whose
    storage is it ]). None when the backward never reached the blocks. ``backward_end_op``:
    where the optimizer's ops begin in the op log (None: all ops are the step's forward and
    backward); an optimizer that updates in place makes no storage, so its ops share the
    backward's last tick and the clock alone would count them in the first stage's backward."""
    regions = _regions(run, recorder, root, forward_started_s)
    if any(r.mark is None for r in regions if not r.pinned):
        return None
    live, after = ledger._live_curves()
    marks = sorted((r.mark.tick, r.mark.time_s, i) for i, r in enumerate(regions)
                   if r.mark is not None)
    backward: dict[int, tuple[int, int, float]] = {}
    for position, (tick, started, i) in enumerate(marks):
        stop, stopped = ((marks[position + 1][0], marks[position + 1][1])
                         if position + 1 < len(marks) else (backward_end, backward_end_s))
        backward[i] = (tick, stop, stopped - started)
    outputs = {r.index for r in regions[-1].outputs}
    read_by_blocks = {r.index for call in run.calls for r in call.inputs}
    held = (Category.SAVED_ACTIVATIONS, Category.TEMPORARIES)
    flops, ops = ledger.tick_flops, ledger.ops or []
    backward_log = ops if backward_end_op is None else ops[:backward_end_op]
    # Records by birth, so that a stage's are a slice: time linear in depth, not quadratic.
    by_birth = sorted(ledger.records, key=lambda r: r.born)
    births = [r.born for r in by_birth]

    def born_in(start: int, stop: int) -> list[StorageRecord]:
        """The records born in ticks ``start+1..stop``."""
        return by_birth[bisect.bisect_right(births, start):bisect.bisect_right(births, stop)]

    stats = []
    for index, region in enumerate(regions):
        start, stop = region.forward
        flow = {r.index for r in region.outputs}
        born = [r for r in born_in(start, stop)
                if r.category in held and r.index not in outputs]
        # NOTE [ Whose storage is it ]: what outlives the backward is persistent (a cache the
        # model returns); what the stage's own ops saved, or a later stage saves (but for the
        # activation it hands on, the next stage's saves_input), is its tape; what nothing
        # saved but outlives the stage dies with the forward's locals (or, for the prefix's
        # constants that blocks save, with the prefix's backward).
        persistent = [r for r in born if _death(r) > backward_end]
        mortal = [r for r in born if _death(r) <= backward_end]
        own = {r.index: r for r in mortal
               if r.index in region.saved or (r.saved and r.index not in flow)}
        lasting = [r for r in mortal if r.index not in flow and r.index not in own
                   and _death(r) > stop]
        if region.stage.kind == "prefix":
            # Constants the blocks read (attention masks, rotary tables, position ids): a
            # checkpointed block keeps what it received until its backward, so they count as
            # held to the prefix's backward (NOTE [ Whose storage is it ]).
            own.update((r.index, r) for r in lasting
                       if r.index in read_by_blocks or _death(r) > forward_end)
        held_to_forward_end = [r for r in lasting if r.index not in own
                               and _death(r) <= forward_end]
        back_start, back_stop, back_s = backward.get(index, (0, -1, 0.0))
        call = (run.calls[index - (regions[0].stage.kind == "prefix")] if not region.pinned
                else None)
        forward_ops = (ops[call.first_op:call.last_op] if call is not None
                       else _between(ops, start, stop))
        backward_ops = _between(backward_log, back_start, back_stop)
        stats.append(StageStats(
            index=index,
            name=region.stage.name,
            forward_s=region.forward_s,
            backward_s=back_s,
            flops=_sum(flops, start, stop),
            backward_flops=_sum(flops, back_start, back_stop),
            input_bytes=sum(r.bytes for r in region.inputs),
            output_bytes=sum(r.bytes for r in region.outputs),
            saved_bytes=sum(r.bytes for r in own.values()),
            saves_input=any(r.index in region.saved for r in region.inputs),
            saves_output=any(r.index in own for r in region.outputs),
            forward_peak_bytes=_rise(live, after, start, stop),
            backward_peak_bytes=_rise(live, after, back_start, back_stop),
            gradient_bytes=sum(r.bytes for r in _left_by_backward(
                born_in(back_start, back_stop), back_start, back_stop,
                regions[index - 1].mark if index > 0 else None)),
            persistent_bytes=sum(r.bytes for r in persistent),
            forward_held_bytes=sum(r.bytes for r in held_to_forward_end),
            forward_mapped_bytes=_mapped(born_in(start, stop)),
            backward_mapped_bytes=_mapped(born_in(back_start, back_stop)),
            forward_moved_bytes=sum(o.moved for o in forward_ops),
            backward_moved_bytes=sum(o.moved for o in backward_ops),
            forward_ops=len(forward_ops),
            backward_ops=len(backward_ops),
            forward_pointwise=_pointwise(forward_ops),
            backward_pointwise=_pointwise(backward_ops),
            pinned=region.pinned,
            aliases_input=bool(region.inputs) and bool(region.outputs)
            and region.inputs[0].index == region.outputs[0].index,
            ops=() if call is None else _block_ops(
                forward_ops, flow, start, functools.partial(_rise_from, live, after[start])),
            draws_random=ledger.ops is None or any(
                _SEEDED in getattr(o.func, "tags", ()) for o in forward_ops),
        ))
    forward_stop = regions[-1].forward[1]
    backward_start = marks[0][0]
    last_mark = regions[-1].mark
    # The last stage's backward frees the gradient of the model's output, unless someone else
    # holds it: when the model's output is the loss itself, that gradient is the seed that
    # torch.autograd.backward holds until the whole backward is over.
    last_stop = backward[len(regions) - 1][1] if len(regions) - 1 in backward else end
    output_grad_held = last_mark is not None and any(
        r.freed is None or r.freed > last_stop for r in last_mark.grads)
    optimizer_ticks = [after[backward_end], *live[backward_end + 1 : end + 1]]
    return ChainCosts(
        stages=tuple(stats),
        fixed_bytes=after[0],
        loss_peak_bytes=_rise(live, after, forward_stop, backward_start),
        loss_residual_bytes=after[backward_start] - after[forward_stop],
        optimizer_peak_bytes=max(optimizer_ticks) if has_optimizer else 0,
        traced_peak_bytes=max(live),
        output_grad_held=output_grad_held,
        output_grad_bytes=None if last_mark is None else sum(r.bytes for r in last_mark.grads),
        blocks=run.names,
        blocks_found=f"{run.describe()}, saving {format_bytes(run.saved_bytes)} for backward",
        other_runs=run.others,
    )


def _block_ops(entries: Sequence[OpEntry], flow: set[int], start: int,
               rise: Callable[[int, int], int]) -> tuple[BlockOp, ...]:
    """The block's ops as selective recomputation keys them: by op and call count, as
    ``torch.utils.checkpoint``'s selective policy sees them (it skips the ops it ignores).
    ``rise(low, high)``: the live total's highest rise over ticks ``low+1..high``."""
    from torch.utils.checkpoint import SAC_IGNORED_OPS

    counts: dict[str, int] = {}
    found = []
    since = start
    overwritten = {index for entry in entries for index in entry.written}
    for entry in entries:
        if entry.func in SAC_IGNORED_OPS:
            continue
        name = str(entry.func)
        occurrence = counts.get(name, 0)
        counts[name] = occurrence + 1
        found.append(BlockOp(op=name, occurrence=occurrence,
                             cache_bytes=sum(r.bytes for r in entry.born if r.index not in flow),
                             allocates=bool(entry.born) and not any(
                                 r.index in overwritten or r.index in flow
                                 for r in entry.born),
                             flops=entry.flops,
                             moved_bytes=entry.moved, probe=entry.probe,
                             elements=entry.elements, rise_bytes=rise(since, entry.tick)))
        since = entry.tick
    return tuple(found)


def _between(ops: Sequence[OpEntry], start: int, stop: int) -> Sequence[OpEntry]:
    """The ops at ticks ``start+1..stop`` (the log is in tick order)."""
    if stop <= start:
        return ()
    tick = operator.attrgetter("tick")
    return ops[bisect.bisect_right(ops, start, key=tick):bisect.bisect_right(ops, stop, key=tick)]


def _mapped(records: Sequence[StorageRecord]) -> int:
    return sum(r.bytes for r in records if r.bytes >= MAPPED_BYTES)


def _pointwise(entries: Sequence[OpEntry]) -> tuple[tuple[Probe, int], ...]:
    made: dict[Probe, int] = {}
    for entry in entries:
        if entry.probe is not None:
            made[entry.probe] = made.get(entry.probe, 0) + entry.elements
    return tuple(made.items())


def _rise_from(live: Sequence[int], base: int, low: int, high: int) -> int:
    """How far the live total rose above ``base`` over ticks ``low+1..high``."""
    return max(0, max(live[low + 1 : high + 1]) - base) if high > low else 0


def _death(record: StorageRecord) -> float:
    """The tick after which ``record`` died; infinite when it outlived the ledger."""
    return math.inf if record.freed is None else record.freed


def _left_by_backward(records: Sequence[StorageRecord], start: int, stop: int,
                      handed_on: Any) -> list[StorageRecord]:
    """What a stage's backward (ticks ``start+1..stop``) leaves alive for later: its parameters'
    gradients, and a gradient the engine holds until another contribution to the same
    parameter arrives (tied weights, a penalty on the weights) — but not the gradient of its
    input, which it hands on to the stage before (``handed_on``: that stage's mark)."""
    passed = {r.index for r in handed_on.grads} if handed_on is not None else set()
    return [r for r in records if start < r.born <= stop and r.index not in passed
            and (r.category is Category.GRADIENTS or _death(r) > stop)]


def _sum(by_tick: dict[int, int], start: int, stop: int) -> int:
    """The sum over ticks ``start+1..stop`` (a region's own ticks)."""
    if stop <= start:
        return 0
    if stop - start < len(by_tick):
        return sum(by_tick.get(t, 0) for t in range(start + 1, stop + 1))
    return sum(v for t, v in by_tick.items() if start < t <= stop)


def _rise(live: Sequence[int], after: Sequence[int], start: int, stop: int) -> int:
    """How far the live total rose above where it stood at ``start``, over ``start+1..stop``."""
    return _rise_from(live, after[start], start, stop)

