"""Identical blocks traced once: the fake trace of a deep model from a few of its blocks.

NOTE [ Identical blocks traced once ]
A 32- or 80-layer model repeats one block: same class, same parameter shapes, same attributes
(but for a layer's own index). Its step is a prefix, the blocks one after the other, the
suffix and loss, the blocks' backwards in reverse, the prefix's backward and the optimizer:
every block's ops, storages and lifetimes are those of its neighbour moved along the clock.
So the container of blocks (an ``nn.ModuleList`` or ``nn.Sequential``) is cut to 2, 3 and 4
of its blocks (the same module objects, their own names kept, so code that reads ``len()`` or
slices the list still works), each depth is traced, and the ledger of the full depth is built
from the 3-block one: its middle block repeated, every storage born in a block copied to each
block that takes its place, its death moved with it (a block's output dies in the next block's
backward, so relations between blocks are kept as offsets), what exists before the step (the
blocks' parameters) grown by what one more block adds (depth 3 against depth 2). The result is
only used when the same construction, asked for 4 blocks, gives the traced 4-block ledger
record for record and tick for tick, and the chain's statistics of the 3-block trace, its middle
block repeated, give the 4-block chain's, every figure outside the blocks linear in depth over
2, 3 and 4. Otherwise (blocks not identical, a peak that moves, structure that depends on
depth) the model is traced in full, and the notes say why.

The blocks' segments of the clock come from hooks (``memprop.trace.block_clocks``): each
block's forward, the backward's arrival at its output, and the optimizer's first touch of its
parameters (an optimizer that runs per parameter, AdamW on the CPU, updates block after
block); the construction itself is ``memprop.trace.extend``. The planner's chain is extended
apart, by ``memprop.trace.extend_chain`` (its middle block's statistics repeated, the first
and last blocks' linear in depth over 2, 3 and 4, the stages around the blocks the same at
every depth); the planner's trace, which needs the chain alone, is held to the chain's checks
alone.

The cost: 9 blocks traced however deep the model is, plus the construction, linear in depth.
Known limitations: an optimizer that updates every parameter in one op (``foreach``, the
default on a GPU) makes a tick whose storages grow with depth: such steps fail the check and
are traced in full. The extended stages' times are a traced depth's (fake traces price
recomputation in FLOPs, not times). A model whose blocks differ in a way that neither their
attributes nor 4 blocks show (a pattern of layers with a period longer than 2, set outside
the blocks) would be extended from the blocks it showed: every block must have the same
attributes, its own index aside, for that reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memprop.trace.block_clocks import BlockClocks, Bounds
from memprop.trace.calls import CONTAINERS
from memprop.trace.compiled import original
from memprop.trace.extend import (
    DEPTHS,
    TEMPLATE,
    NotRepeating,
    extended_ledger,
    extended_tick,
    same_ledger,
)
from memprop.trace.extend_chain import extended_chain, linear, run_weight
from memprop.trace.stages import ChainCosts
from memprop.trace.step import StepTrace, TrainingTrace, trace_inference, trace_training
from memprop.workload import Workload

__all__ = ["DEPTHS", "Repeats", "Reused", "find_repeats", "trace_reusing_blocks",
           "traced_in_full"]

SHORTEST = 12
"""The fewest identical blocks extended: 9 blocks are traced, so a shallower model is traced
in full, sooner (an 8-layer Llama: 0.95 s extended against 0.58 s in full)."""


_in_full: contextvars.ContextVar[bool] = contextvars.ContextVar("memprop_in_full",
                                                               default=False)


@contextlib.contextmanager
def traced_in_full() -> Iterator[None]:
    """Within the block, fake traces trace every block (the oracle the tests and the bench hold
    the extended traces to)."""
    token = _in_full.set(True)
    try:
        yield
    finally:
        _in_full.reset(token)


@dataclass(frozen=True, kw_only=True, slots=True)
class Repeats:
    """A run of identical items of a container, the blocks to trace once."""

    name: str
    """The container's qualified name ('' for the model itself)."""
    container: nn.Module = field(repr=False)
    keys: tuple[str, ...]
    """Every item's key in the container, in order."""
    lo: int
    hi: int
    """The identical items are ``keys[lo:hi]``."""

    @property
    def depth(self) -> int:
        return self.hi - self.lo

    def block_name(self, position: int) -> str:
        """The qualified name of the ``position``-th identical block."""
        key = self.keys[self.lo + position]
        return f"{self.name}.{key}" if self.name else key


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    found = {}
    for path, sub in module.named_modules():
        for name, value in vars(sub).items():
            if not name.startswith("_") and isinstance(value, (bool, int, float, str, type(None))):
                found[f"{path}.{name}"] = value
    return found


def _signature(module: nn.Module) -> tuple[Any, ...]:
    """What must be equal for two blocks to be one block repeated (integers aside: a layer's
    own index differs from block to block)."""
    tensors = tuple((name, tuple(t.shape), t.dtype, t.requires_grad, t.device)
                    for name, t in (*module.named_parameters(), *module.named_buffers()))
    kinds = tuple((path, type(sub)) for path, sub in module.named_modules())
    attributes = tuple(sorted((k, v) for k, v in _plain_attributes(module).items()
                              if type(v) is not int))
    return tensors, kinds, attributes


def _integers(module: nn.Module) -> dict[str, int]:
    return {k: v for k, v in _plain_attributes(module).items() if type(v) is int}


def _longest_identical(items: Sequence[nn.Module]) -> tuple[int, int]:
    """The longest range of items with one signature, whose integer attributes are each the
    same in every item or move with the item's position (a layer's own index)."""
    signatures = [(type(m), _signature(m)) for m in items]
    integers = [_integers(m) for m in items]
    best = (0, 0)
    start = 0
    modes: dict[str, set[str]] = {}
    for end in range(len(items) + 1):
        if end < len(items) and end > start and signatures[end] == signatures[start] \
                and set(integers[end]) == set(integers[start]):
            for key, first in integers[start].items():
                value = integers[end][key]
                if value != first:
                    modes[key].discard("same")
                if value - end != first - start:
                    modes[key].discard("moving")
            if all(modes.values()):
                continue
        if end - start > best[1] - best[0]:
            best = (start, end)
        start = end
        modes = {key: {"same", "moving"} for key in (integers[end] if end < len(items) else ())}
    return best


def find_repeats(model: nn.Module, named: str | None = None) -> Repeats | None:
    """The longest run of identical items of a container of ``model`` (of ``named`` when
    given), the heaviest when several are as long; None when none has ``SHORTEST`` items."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, CONTAINERS) or (named is not None and name != named):
            continue
        items = list(module._modules.values())
        if any(item is None for item in items):
            continue
        lo, hi = _longest_identical(items)
        if hi - lo >= SHORTEST:
            weight = sum(p.numel() for m in items[lo:hi] for p in m.parameters())
            found.append((hi - lo, weight, Repeats(name=name, container=module,
                                                   keys=tuple(module._modules), lo=lo, hi=hi)))
    if not found:
        return None
    return max(found, key=lambda f: (f[0], f[1]))[2]


@contextlib.contextmanager
def _cut(repeats: Repeats, depth: int) -> Iterator[None]:
    """The container holds only ``depth`` of the identical blocks (the first ones, with their
    own keys) and what is around them, until the block exits."""
    container = repeats.container
    original = container._modules
    kept = set(repeats.keys[:repeats.lo + depth]) | set(repeats.keys[repeats.hi:])
    container._modules = OrderedDict((k, m) for k, m in original.items() if k in kept)
    try:
        yield
    finally:
        container._modules = original


@dataclass(frozen=True, kw_only=True, slots=True)
class _Traced:
    training: TrainingTrace
    bounds: Bounds
    inference: StepTrace | None
    inference_bounds: Bounds | None
    weight: int


# -- the traces ----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class Reused:
    """The full depth's traces, built from a few blocks (NOTE [ Identical blocks traced
    once ]), or why the model was traced in full."""

    training: TrainingTrace | None
    inference: StepTrace | None
    note: str


@contextlib.contextmanager
def _state_kept(workload: Workload) -> Iterator[None]:
    """The gradients, the optimizer's state and the generator put back after the block, so
    that each depth starts where the full trace would. On fake tensors what a step starts
    with is which of them exist (``memprop.loop.state_signature``), not values: the tensors
    themselves are put back, not copies."""
    grads = [(p, p.grad) for p in workload.model.parameters()]
    optimizer = workload.optimizer
    state = {} if optimizer is None else {p: dict(s) for p, s in optimizer.state.items()}
    generator = torch.get_rng_state()
    try:
        yield
    finally:
        for parameter, grad in grads:
            parameter.grad = grad
        if optimizer is not None:
            optimizer.state.clear()
            optimizer.state.update(state)
        torch.set_rng_state(generator)


def _trace_at(workload: Workload, repeats: Repeats, depth: int, *, inference: bool,
              create_graph: bool, log_ops: bool) -> _Traced:
    blocks = [repeats.container._modules[k] for k in repeats.keys[repeats.lo:repeats.lo + depth]]
    with _state_kept(workload), _cut(repeats, depth):
        clocks = BlockClocks(workload.model, blocks, workload.optimizer)  # type: ignore[arg-type]
        try:  # in profile's order: the inference pass, then the training step
            served = trace_inference(workload) if inference else None
            training = trace_training(workload, create_graph=create_graph, log_ops=log_ops)
        finally:
            clocks.remove()
    bounds = clocks.bounds.get(id(training.steady.ledger), Bounds())
    chain = training.steady.chain
    weight = 0 if chain is None else run_weight(training.steady.ledger, bounds.calls,
                                                 chain.blocks)
    return _Traced(training=training, bounds=bounds, inference=served,
                   inference_bounds=None if served is None
                   else clocks.bounds.get(id(served.ledger), Bounds()),
                   weight=weight)


def _grown_step(steps: Sequence[StepTrace], bounds: Bounds, repeats: Repeats, depth: int,
                chain: ChainCosts | None) -> StepTrace:
    """The step at ``depth``, from the steps traced at ``DEPTHS``: the template's ledger
    extended, the construction first checked against the deepest traced."""
    smaller, template, check = steps
    name = repeats.block_name
    built = extended_ledger(template.ledger, smaller.ledger, bounds, name, DEPTHS[-1])
    if not same_ledger(built, check.ledger, name):
        raise NotRepeating(f"the ledger of {DEPTHS[-1]} blocks built from {TEMPLATE} is not "
                           "the traced one")
    clock = template.ledger.clock
    landmarks = ("forward_end", "backward_end", "end")
    for landmark in landmarks:
        if extended_tick(bounds, clock, DEPTHS[-1], getattr(template, landmark)) \
                != getattr(check, landmark):
            raise NotRepeating(f"the step's {landmark.replace('_', ' ')} moves")
    return dataclasses.replace(
        template, ledger=extended_ledger(template.ledger, smaller.ledger, bounds, name, depth),
        forward_end=extended_tick(bounds, clock, depth, template.forward_end),
        backward_end=extended_tick(bounds, clock, depth, template.backward_end),
        end=extended_tick(bounds, clock, depth, template.end),
        stages=() if chain is None else chain.stages, chain=chain, wall_s=0.0)


def _cache_note(workload: Workload, step: StepTrace) -> list[str]:
    """The note on a Hugging Face key/value cache, which names the bytes it keeps at the
    step's depth."""
    from memprop.trace.step import _note_caches

    found: list[str] = []
    _note_caches(workload, step, found)
    return found


def trace_reusing_blocks(workload: Workload, *, inference: bool = True,
                         create_graph: bool = False, log_ops: bool = False,
                         ledger: bool = True) -> Reused | None:
    """The training step (and, with ``inference``, the inference pass) of ``workload`` on fake
    tensors at its full depth, from traces of 2, 3 and 4 of its identical blocks (NOTE
    [ Identical blocks traced once ]). ``ledger=False`` builds the chain's statistics only
    (the planner's need): the step's ledger is then the 3-block trace's. None when the model
    has fewer than ``SHORTEST`` identical blocks; a ``Reused`` without traces, whose note
    says why, when the traced depths are not one block repeated (the caller traces in
    full)."""
    # A compiled model's step is inductor's graphs (memprop.trace.compiled), which have no blocks
    # to cut: traced whole, with no note about blocks it never had.
    compiled = original(workload.model) is not workload.model
    repeats = (None if _in_full.get() or compiled
               else find_repeats(workload.model, workload.blocks))
    if repeats is None:
        return None
    started = time.perf_counter()
    depth, container = repeats.depth, repeats.name or "the model"
    try:
        traced = {k: _trace_at(workload, repeats, k, inference=inference,
                               create_graph=create_graph, log_ops=log_ops) for k in DEPTHS}
    except Exception as error:
        return Reused(training=None, inference=None,
                      note=f"traced in full: {depth} blocks of {container} look identical, "
                           f"but the model fails with fewer ({type(error).__name__})")
    try:
        chain = extended_chain([traced[k].training.steady.chain for k in DEPTHS],
                               [traced[k].weight for k in DEPTHS], repeats.block_name,
                               workload.model, depth)
        trainings = [traced[k].training for k in DEPTHS]
        notes = linear([tuple(n for n in t.notes if n not in _cache_note(workload, t.steady))
                         for t in trainings], depth, "the trace's notes")
        first_peak = linear([t.first_step_peak_bytes for t in trainings], depth,
                             "the first step's peak")
        steady = [t.steady for t in trainings]
        if ledger:
            step = _grown_step(steady, traced[TEMPLATE].bounds, repeats, depth, chain)
        else:  # the planner's need: the chain, on the template's step
            step = dataclasses.replace(steady[1], stages=() if chain is None else chain.stages,
                                       chain=chain)
        served = None
        if inference:
            passes = [traced[k].inference for k in DEPTHS]
            bounds = traced[TEMPLATE].inference_bounds
            assert bounds is not None and all(p is not None for p in passes)
            served = _grown_step(passes, bounds, repeats, depth, None)  # type: ignore[arg-type]
    except NotRepeating as why:
        return Reused(training=None, inference=None,
                      note=f"traced in full: {depth} blocks of {container} look identical, "
                           f"but {why}")
    note = (f"{depth} identical blocks of {container} traced as "
            f"{', '.join(map(str, DEPTHS))} and extended (checked exact at {DEPTHS[-1]})")
    # Every second spent, the traces of each depth and the construction, is the step's.
    step = dataclasses.replace(step, wall_s=time.perf_counter() - started)
    training = TrainingTrace(steady=step, first_step_peak_bytes=first_peak,
                             device_rise_bytes=None,
                             notes=(*notes, *_cache_note(workload, step), note))
    return Reused(training=training, inference=served, note=note)
