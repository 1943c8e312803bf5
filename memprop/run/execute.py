"""Execute a plan's tree on the stages of an ``nn.Sequential`` with nested checkpoints.

A :class:`memprop.plan.Segment` child that is an ``int`` is a stage run normally; a child that is
a ``Segment`` runs under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, which
keeps only the segment's input and, when backward reaches the segment, re-runs it (by its own
children, so multi-level schedules nest checkpoints) and then differentiates it.

# NOTE [ What a recomputation must not change ]
- Random state: ``preserve_rng_state=True`` (checkpoint's default) stashes the RNG state before
  the first run and restores it for the re-run, so dropout draws the same mask and the gradients
  are bit for bit those of the unplanned step.
- BatchNorm's running statistics: a training-mode BatchNorm updates ``running_mean``,
  ``running_var`` and ``num_batches_tracked`` every time it runs, so a plain re-run updates them
  twice (``checkpoint_sequential``'s silent bug). During a re-run memprop sets the segment's
  BatchNorms' momentum to 0 and hides their batch counter: the op and its output are the same,
  and the buffers keep their values bit for bit. (Turning ``track_running_stats`` off instead
  would change what the op saves, which checkpoint rejects.) A re-run is told from the
  first run by counting calls of the segment's function: checkpoint calls it once in the forward
  and once more per recomputation; a checkpoint nested inside a re-run segment is covered by its
  parent's switch.
- Early stop: checkpoint may stop a re-run as soon as the saved tensors it needs exist, skipping
  the segment's last ops. memprop turns that off so the re-run is the one the planner priced
  (its output, then dropped) and the recomputed FLOPs are exactly the plan's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from memprop.plan.schedule import Segment

__all__ = ["Calls", "installed", "run_tree"]


def run_tree(stages: Sequence[nn.Module], tree: Segment, x: torch.Tensor) -> torch.Tensor:
    """Run stages ``tree.start..tree.stop-1`` on ``x`` as the tree says."""
    for child in tree.children:
        if isinstance(child, int):
            x = stages[child](x)
        else:
            x = checkpoint(_SegmentRun(stages, child), x, use_reentrant=False,
                           preserve_rng_state=True, early_stop=False)
    return x


class _SegmentRun:
    """The function one checkpoint call runs; its second call is the recomputation."""

    def __init__(self, stages: Sequence[nn.Module], segment: Segment) -> None:
        self.stages = stages
        self.segment = segment
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.calls > 0
        self.calls += 1
        modules = self.stages[self.segment.start : self.segment.stop]
        context = _frozen_norm_stats(modules) if recompute else contextlib.nullcontext()
        with context:
            return run_tree(self.stages, self.segment, x)


@contextlib.contextmanager
def _frozen_norm_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    # Momentum 0 makes the update ``(1 - 0) * running + 0 * batch``, the running value itself,
    # bit for bit (batch statistics are finite); without its counter buffer BatchNorm does not
    # count the batch. The op itself is unchanged, so it saves the same tensors for backward as
    # in the first run (checkpoint matches recomputed tensors to saved ones by position).
    switched = [
        (m, m.momentum, m.num_batches_tracked) for stage in modules for m in stage.modules()
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


@dataclass(kw_only=True, slots=True)
class Calls:
    """How often an installed plan ran: a plan that never runs keeps nothing it promised."""

    expected: bool
    """Whether the plan changes the step (it recomputes something), so that it must run."""
    count: int = 0
    """Training forwards of the chain under the plan so far."""


@contextlib.contextmanager
def installed(chain: nn.Sequential, tree: Segment) -> Iterator[Calls]:
    """Make ``chain(x)`` run ``tree`` until the block exits (an instance attribute shadows
    ``nn.Sequential.forward``; hooks on the chain still fire, since ``__call__`` is untouched).
    The block receives a :class:`Calls` that counts the training forwards run under the plan."""
    stages = list(chain)
    if tree.start != 0 or tree.stop != len(stages):
        raise ValueError(f"the plan covers stages {tree.start}..{tree.stop}, the chain has "
                         f"{len(stages)}")

    if all(isinstance(child, int) for child in tree.children):
        yield Calls(expected=False)  # nothing to recompute: the chain's own forward is the plan
        return
    calls = Calls(expected=True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return run_tree(stages, Segment(start=0, stop=len(stages),
                                            children=tuple(range(len(stages)))), x)
        calls.count += 1
        return run_tree(stages, tree, x)

    chain.forward = forward  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del chain.forward
