"""A plan installed on the model's own blocks, in place, for as long as a ``with`` block lasts.

Each block the plan recomputes gets an instance attribute ``forward`` that shadows its class's
(the same parameter objects, the same ``state_dict`` keys, hooks still fire since ``__call__`` is
untouched), so the model's own forward, whether an ``nn.Sequential`` or a Python loop over an
``nn.ModuleList``, runs the plan without knowing it. The shadow runs the plan of the thread that
calls it (NOTE [ Plans installed per thread ]): one model may run under plans in several threads.

NOTE [ Spans ]
A checkpointed segment of several blocks is one ``torch.utils.checkpoint`` (non-reentrant) that
spans several calls the model's forward makes: the first block's call opens it (the checkpoint's
own generator, ``_checkpoint_without_reentrant_generator``, run up to its ``yield``), the blocks
run plainly under its saved-tensor hooks, and the last block's call closes it. Only the first
block's input is kept; when backward reaches the segment, the checkpoint re-runs it with the
arguments each block received (the previous block's output in place of its first), under the
segment's own inner plan, as nested ordinary checkpoints (:func:`_run_tree`): multi-level
recomputation, as the planner's trees say.

NOTE [ What a recomputation must not change ]
- Random state: a checkpoint around a block that draws random numbers (dropout: the plan's
  ``draws_random``, from the traced ops tagged ``nondeterministic_seeded``) stashes the
  generators' state before the first run and restores it for the re-run
  (``preserve_rng_state``), so dropout draws the same mask and the gradients are bit for bit
  those of the unplanned step. Around blocks that draw nothing the stash would be dead weight
  (``torch.get_rng_state()``, 5,056 bytes on the CPU, each checkpoint for as long as it
  lives): they are checkpointed without it, and their re-run leaves the generators as the
  unplanned step does, since it draws nothing either.
- BatchNorm's running statistics: a training-mode BatchNorm updates ``running_mean``,
  ``running_var`` and ``num_batches_tracked`` every time it runs, so a plain re-run updates
  them twice (``checkpoint_sequential``'s silent bug). During a re-run memprop sets the
  segment's BatchNorms' momentum to 0 and hides their batch counter: the op and its output are
  the same, and the buffers keep their values bit for bit.
- Early stop: checkpoint may stop a re-run as soon as the saved tensors it needs exist,
  skipping the segment's last ops. memprop turns that off so that the re-run is the one the
  planner priced (every op, then its output dropped).

NOTE [ Selective options ]
A block checkpointed alone at the top level may keep some of its op outputs (``Plan.selective``,
``memprop.plan.selective``): its checkpoint runs under torch's selective policy
(``create_selective_checkpoint_contexts``), which saves the outputs of the ops the plan names,
by op and by which call of it in the block's forward, and hands them back at the re-run instead
of running those ops again. Only top-level checkpoints take options: a selective checkpoint
nested in another keeps its cache alive for as long as the outer one's first run holds it, which
the planner does not model.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.torch_version import TorchVersion
from torch.utils import checkpoint as torch_checkpoint

from memprop.errors import UsageError
from memprop.plan.schedule import Segment
from memprop.plan.selective import Option
from memprop.trace.caches import caching_configs, without_caches
from memprop.trace.compiled import original
from memprop.trace.head import chunked_head
from memprop.trace.stages import StageRef

__all__ = ["Calls", "caching_configs", "installed", "without_caches"]


@dataclass(kw_only=True, slots=True)
class Calls:
    """How often an installed plan ran: a plan that never runs keeps nothing it promised."""

    expected: bool
    """Whether the plan changes the step (it recomputes something), so that it must run."""
    count: int = 0
    """Training forwards that ran a recomputed block under the plan so far."""


@dataclass(kw_only=True, slots=True)
class _Block:
    """One block as the plan runs it."""

    module: nn.Module
    run: Any
    """The class's forward, bound to the module: what the plan runs."""
    draws_random: bool = True
    """Whether its forward draws random numbers (NOTE [ What a recomputation must not
    change ])."""


@dataclass(kw_only=True, slots=True, eq=False)
class _Span:
    """A top-level checkpointed segment in flight (NOTE [ Spans ])."""

    segment: Segment
    generator: Any = None
    arguments: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    """Each block's arguments as the model's forward passed them."""


def _blocks(model: nn.Module, stage_names: Sequence[str], draws_random: Sequence[bool]
            ) -> list[_Block | None]:
    modules = dict(model.named_modules())
    blocks: list[_Block | None] = []
    for index, name in enumerate(stage_names):
        if not StageRef.named(name).is_block:
            blocks.append(None)
            continue
        module = modules.get(name)
        if module is None:
            raise UsageError(f"the plan names block {name!r}, which {type(model).__name__} does "
                             "not have: plan this model again")
        blocks.append(_Block(module=module, run=type(module).forward.__get__(module),
                             draws_random=not draws_random or draws_random[index]))
    return blocks


def _draws_random(blocks: list[_Block | None], segment: Segment) -> bool:
    """Whether a checkpoint of ``segment`` must keep the generators' state for its re-run."""
    return any(b is None or b.draws_random for b in blocks[segment.start:segment.stop])


@contextlib.contextmanager
def installed(model: nn.Module, stage_names: Sequence[str], tree: Segment,
              selective: Mapping[int, Option] | None = None,
              draws_random: Sequence[bool] = (), *, head_chunks: int = 0) -> Iterator[Calls]:
    """Make the model's forward run ``tree`` (a plan over the stages ``stage_names``: blocks by
    qualified name, and the prefix and suffix, which stay as they are) until the block exits,
    the stages in ``selective`` (``Plan.selective``) keeping their options' op outputs (NOTE
    [ Selective options ]), the generators' state kept only by checkpoints around stages that
    ``draws_random`` (``Plan.draws_random``; empty: every checkpoint keeps it), the head and
    the loss in ``head_chunks`` chunks of tokens when it is not 0 (``Plan.head_chunks``,
    ``memprop.trace.head``). The block receives a :class:`Calls` that counts the training
    forwards that ran the plan."""
    if tree.start != 0 or tree.stop != len(stage_names):
        raise ValueError(f"the plan covers stages {tree.start}..{tree.stop}, the chain has "
                         f"{len(stage_names)}")
    if draws_random and len(draws_random) != len(stage_names):
        raise ValueError(f"draws_random has {len(draws_random)} entries, the chain "
                         f"{len(stage_names)} stages")
    model = original(model)  # NOTE [ Compiled models are traced eagerly ]: named as traced
    blocks = _blocks(model, stage_names, draws_random)
    paths = _paths(tree)
    # With nothing to recompute the model's own forward is the plan, at no cost: no block is
    # wrapped, but the step still runs as planned, without a key/value cache.
    calls = Calls(expected=bool(paths))
    spans: dict[Segment, _Span] = {}
    contexts = {index: _selective_contexts(frozenset(option.keep))
                for index, option in (selective or {}).items()}
    planned: dict[nn.Module, Any] = {}
    for index, path in paths.items():
        block = blocks[index]
        if block is None:
            raise ValueError(f"the plan recomputes {stage_names[index]}, which stays kept")
        planned[block.module] = functools.partial(_spanned, blocks, index, path, spans, calls,
                                                  contexts)
    _shadow(planned)
    try:
        with without_caches(model), chunked_head(model, head_chunks):
            yield calls
    finally:
        try:
            for span in spans.values():
                if span.generator is not None:
                    span.generator.close()
        finally:
            _unshadow(planned)


# NOTE [ Plans installed per thread ]
# A block's forward is shadowed by an instance attribute that every thread shares, so the
# shadow itself holds no plan: it runs the plan that the calling thread installed on the block
# (its own spans, its own checkpoints' saved-tensor hooks, pushed and popped by that thread),
# or the block's own forward when the thread installed none. The shadow is set by the first
# installation on a block, in any thread, and removed by the last (counted under a lock), so
# that several threads may run one model under one plan or several, and a plan may be
# installed inside another's run. What stays shared between threads: BatchNorm's momentum is
# zeroed while a re-run is under way (NOTE [ What a recomputation must not change ]).
_shadows_lock = threading.Lock()
_shadowed: dict[nn.Module, tuple[int, Any]] = {}
"""Per shadowed block: how many installations hold it, and the instance ``forward`` it had
before (``None``: none, the class's)."""
_installed_here = threading.local()
"""``plans``: per block, the forwards this thread installed on it, innermost last."""


def _plans_here() -> dict[nn.Module, list[Any]]:
    plans: dict[nn.Module, list[Any]] | None = getattr(_installed_here, "plans", None)
    if plans is None:
        plans = _installed_here.plans = {}
    return plans


def _shadow(planned: Mapping[nn.Module, Any]) -> None:
    here = _plans_here()
    with _shadows_lock:
        for module, forward in planned.items():
            count, before = _shadowed.get(module, (0, None))
            if count == 0:
                before = vars(module).get("forward")
                module.forward = functools.partial(_planned_here, module,
                                                   before or type(module).forward.__get__(module))
            _shadowed[module] = (count + 1, before)
            here.setdefault(module, []).append(forward)


def _unshadow(planned: Mapping[nn.Module, Any]) -> None:
    here = _plans_here()
    with _shadows_lock:
        for module in planned:
            stack = here[module]
            stack.pop()
            if not stack:
                del here[module]
            count, before = _shadowed.pop(module)
            if count > 1:
                _shadowed[module] = (count - 1, before)
            elif before is not None:
                module.forward = before
            else:
                del module.forward


def _planned_here(module: nn.Module, own: Any, *args: Any, **kwargs: Any) -> Any:
    """A shadowed block's forward: the plan this thread installed on it, else its own."""
    stack = _plans_here().get(module)
    return (stack[-1] if stack else own)(*args, **kwargs)


def _paths(tree: Segment) -> dict[int, tuple[Segment, ...]]:
    """For each stage inside a checkpointed segment, the segments that hold it, outermost
    first: the checkpoints its call opens, runs in, and closes (NOTE [ Spans ])."""
    paths: dict[int, tuple[Segment, ...]] = {}

    def walk(segment: Segment, outer: tuple[Segment, ...]) -> None:
        for child in segment.children:
            if isinstance(child, int):
                if outer:
                    paths[child] = outer
            else:
                walk(child, (*outer, child))

    walk(tree, ())
    return paths


def _spanned(blocks: list[_Block | None], index: int, path: tuple[Segment, ...],
             spans: dict[Segment, _Span], calls: Calls, contexts: dict[int, Any], *args: Any,
             **kwargs: Any) -> Any:
    """The forward of block ``index``, inside the checkpointed segments ``path``: it opens the
    ones that start with it, runs under all of them, and closes the ones it ends."""
    block = blocks[index]
    assert block is not None
    if not torch.is_grad_enabled():
        return block.run(*args, **kwargs)  # prediction: the plan is for training steps
    for segment in path:
        if segment.start == index:
            span = spans[segment] = _Span(segment=segment)
            context = contexts.get(index) if segment is path[0] else None
            span.generator = _open(_SpanRun(blocks, span), args, kwargs, context,
                                   preserve_rng_state=_draws_random(blocks, segment))
            if segment is path[0]:
                calls.count += 1
        # Not the activation itself: holding it would keep what the checkpoint drops (the
        # re-run hands each block the previous block's recomputed output instead).
        spans[segment].arguments.append(((None, *args[1:]), kwargs))
    try:
        output = block.run(*args, **kwargs)
    except BaseException as error:
        for segment in reversed(path):
            _close(spans.pop(segment), error)
        raise
    for segment in reversed(path):
        if segment.stop - 1 == index:
            _close(spans.pop(segment), None)
    return output


def _close(span: _Span, error: BaseException | None) -> None:
    generator, span.generator = span.generator, None
    with contextlib.suppress(StopIteration):
        if error is None:
            next(generator)
        else:
            generator.throw(error)


# NOTE [ Checkpoint's generator ]
# A span needs a checkpoint that opens in one call and closes in another, which no public
# ``torch.utils.checkpoint`` entry point offers; the generator behind ``checkpoint`` does (run
# to its ``yield``, it has pushed its saved-tensor hooks). Its settings precede the function's
# own ``*args``, so they cannot be passed by keyword: they are named in ``_generator_settings``
# and laid out in the generator's declared order, which changed once in memprop's torch range
# (>= 2.4): ``early_stop`` joined ``debug`` in torch 2.9 (pytorch/pytorch#160781, on the
# 2.9 nightlies already, hence ``2.9.0a0``).
_GENERATOR_HAS_EARLY_STOP = TorchVersion(torch.__version__) >= "2.9.0a0"


def _generator_settings(*, preserve_rng_state: bool, context_fn: Any) -> dict[str, Any]:
    """The generator's settings by name, in its declared order (NOTE [ Checkpoint's
    generator ]). Early stop is off (NOTE [ What a recomputation must not change ]); the
    ``set_checkpoint_early_stop`` context in :func:`_open` says so on every version too."""
    settings: dict[str, Any] = {
        "preserve_rng_state": preserve_rng_state,
        "context_fn": context_fn or torch_checkpoint.noop_context_fn,
        "determinism_check": "default",
        "debug": False,
    }
    if _GENERATOR_HAS_EARLY_STOP:
        settings["early_stop"] = False
    return settings


def _open(run: Any, args: tuple[Any, ...], kwargs: dict[str, Any], context_fn: Any = None,
          *, preserve_rng_state: bool = True) -> Any:
    """A non-reentrant checkpoint of ``run`` opened on the first block's arguments, its
    saved-tensor hooks pushed until the generator is resumed (NOTE [ Spans ]); ``context_fn``
    is checkpoint's own (a selective policy, NOTE [ Selective options ])."""
    settings = _generator_settings(preserve_rng_state=preserve_rng_state, context_fn=context_fn)
    with torch_checkpoint.set_checkpoint_early_stop(False):
        generator = torch_checkpoint._checkpoint_without_reentrant_generator(
            run, *settings.values(), *args, **kwargs)
        next(generator)
    return generator


def _selective_contexts(keep: frozenset[tuple[str, int]]) -> Any:
    """Checkpoint's ``context_fn`` for a block that keeps the outputs of the op calls ``keep``
    ((aten op, which call of it), counted as the policy sees them, which is how the planner
    counted them: ``memprop.trace.stages.BlockOp``)."""
    save, recompute = (torch_checkpoint.CheckpointPolicy.MUST_SAVE,
                       torch_checkpoint.CheckpointPolicy.PREFER_RECOMPUTE)

    def context_fn() -> Any:
        seen: dict[str, int] = {}

        def policy(context: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
            name = str(op)
            occurrence = seen.get(name, 0)
            seen[name] = occurrence + 1
            return save if (name, occurrence) in keep else recompute

        return torch_checkpoint.create_selective_checkpoint_contexts(policy)

    return context_fn


class _SpanRun:
    """The recomputation of a span: its blocks re-run under the segment's inner plan, each with
    the arguments the model's forward gave it, the previous block's output first."""

    def __init__(self, blocks: list[_Block | None], span: _Span) -> None:
        self.blocks = blocks
        self.span = span

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        segment = self.span.segment
        arguments = list(self.span.arguments)
        arguments[0] = (args, kwargs)
        modules = [b.module for b in self.blocks[segment.start:segment.stop] if b is not None]
        with _frozen_norm_stats(modules):
            return _run_tree(self.blocks, segment, arguments)


def _run_tree(blocks: list[_Block | None], tree: Segment,
              arguments: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> Any:
    """Run stages ``tree.start..tree.stop-1`` as the tree says, each with its recorded
    arguments (``arguments[i]`` for stage ``tree.start + i``), the previous output first."""
    output: Any = None
    for child in tree.children:
        first = child if isinstance(child, int) else child.start
        args, kwargs = arguments[first - tree.start]
        if output is not None:
            args = (_main(output), *args[1:])
        if isinstance(child, int):
            block = blocks[child]
            assert block is not None
            output = block.run(*args, **kwargs)
        else:
            inner = arguments[child.start - tree.start : child.stop - tree.start]
            output = torch_checkpoint.checkpoint(
                _Rerun(blocks, child, inner), *args, use_reentrant=False,
                preserve_rng_state=_draws_random(blocks, child), early_stop=False, **kwargs)
    return output


class _Rerun:
    """A nested checkpoint inside a recomputation; its own re-run freezes BatchNorm."""

    def __init__(self, blocks: list[_Block | None], segment: Segment,
                 arguments: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
        self.blocks, self.segment, self.arguments = blocks, segment, arguments
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        recompute = self.calls > 0
        self.calls += 1
        arguments = [(args, kwargs), *self.arguments[1:]]
        modules = [b.module for b in self.blocks[self.segment.start:self.segment.stop]
                   if b is not None]
        with _frozen_norm_stats(modules) if recompute else contextlib.nullcontext():
            return _run_tree(self.blocks, self.segment, arguments)


def _main(output: Any) -> Any:
    """The activation a block hands on: its output, or the first tensor of a tuple output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UsageError(f"a block returned {type(output).__name__}: memprop plans blocks that return "
                     "their activation, alone or first in a tuple")


@contextlib.contextmanager
def _frozen_norm_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    # Momentum 0 makes the update ``(1 - 0) * running + 0 * batch``, the running value itself,
    # bit for bit (batch statistics are finite); without its counter buffer BatchNorm does not
    # count the batch. The op itself is unchanged, so it saves the same tensors for backward as
    # in the first run (checkpoint matches recomputed tensors to saved ones by position).
    switched = [
        (m, m.momentum, m.num_batches_tracked) for block in modules for m in block.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
    for module, _, _ in switched:
        module.momentum = 0.0
        module.num_batches_tracked = None
    try:
        yield
    finally:
        for module, momentum, counter in switched:
            module.momentum = momentum
            module.num_batches_tracked = counter
