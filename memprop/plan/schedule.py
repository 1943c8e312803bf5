"""Plans as trees that nested ``torch.utils.checkpoint`` executes, and their simulator.

A :class:`Segment` covers stages ``[start, stop)``. Its children, in order, partition that range:
an ``int`` is a stage run normally (its tape kept until its backward); a nested ``Segment`` is
checkpointed (only its input stored; when backward reaches it, it is re-run by its own children
and then differentiated). The runtime turns a Segment into an ``nn.Sequential`` whose checkpointed
children are wrapped in ``checkpoint(..., use_reentrant=False)``, recursively.

Example, 4 stages, stages 0-1 checkpointed, 2 and 3 kept::

    Segment(start=0, stop=4, children=(Segment(start=0, stop=2, children=(0, 1)), 2, 3))

:func:`simulate` folds the tree's schedule (:mod:`memprop.plan.actions`, the execution order as
actions) with the one memory model (:mod:`memprop.plan.memory`): the single source of truth for
a plan's peak and compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from memprop.plan.actions import actions_of, readable
from memprop.plan.chain import Chain
from memprop.plan.memory import Ledger

__all__ = ["Segment", "Simulation", "schedule_ops", "simulate"]

Child = Union[int, "Segment"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Segment:
    """Stages ``[start, stop)`` and how each child runs."""

    start: int
    """First stage."""
    stop: int
    """One past the last stage."""
    children: tuple[Child, ...]
    """Kept stages (``int``) and checkpointed sub-segments, partitioning ``[start, stop)``."""
    option: int = 0
    """For a checkpoint of one stage at the top level: which of the stage's selective options
    (``Stage.options``, from 1) it runs, keeping those op outputs until its re-run; 0 keeps
    nothing (a plain checkpoint)."""

    def __post_init__(self) -> None:
        at = self.start
        for child in self.children:
            first = child if isinstance(child, int) else child.start
            stop = child + 1 if isinstance(child, int) else child.stop
            if first != at or stop <= first:
                raise ValueError(f"children of {self.start}..{self.stop} do not partition it")
            at = stop
        if at != self.stop:
            raise ValueError(f"children of {self.start}..{self.stop} stop at {at}")
        if self.option and self.stop - self.start != 1:
            raise ValueError(f"a selective option on {self.start}..{self.stop}: options are "
                             f"per stage")

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "start": self.start,
            "stop": self.stop,
            "children": [c if isinstance(c, int) else c.to_dict() for c in self.children],
        }
        if self.option:
            document["option"] = self.option
        return document


@dataclass(frozen=True, kw_only=True, slots=True)
class Simulation:
    """What executing a tree costs, under the chain's memory model."""

    peak_bytes: int
    """The training peak, ``fixed_bytes`` and the optimizer's moment included."""
    chain_peak_bytes: int
    """The peak of the forward, loss and backward alone (``fixed_bytes`` included): what the
    plan changes."""
    compute: float
    """Total cost of every forward run and every backward."""
    forward_runs: tuple[int, ...]
    """How many times each stage's forward runs (1 when never recomputed)."""


def flat(n: int) -> Segment:
    """No recomputation: every stage kept."""
    return Segment(start=0, stop=n, children=tuple(range(n)))


def simulate(chain: Chain, tree: Segment) -> Simulation:
    """Execute ``tree`` on paper: its schedule (:func:`memprop.plan.actions.actions_of`) folded
    by the memory model (:class:`memprop.plan.memory.Ledger`): the peak (``fixed_bytes`` and the
    optimizer's moment included) and the total compute."""
    n = len(chain)
    if tree.start != 0 or tree.stop != n:
        raise ValueError(f"the plan covers {tree.start}..{tree.stop}, the chain 0..{n}")
    ledger = Ledger(chain)
    ledger.hold(0)
    ledger.fold(actions_of(tree))
    chain_peak = chain.fixed_bytes + ledger.peak
    return Simulation(
        peak_bytes=max(chain_peak, chain.optimizer_peak_bytes),
        chain_peak_bytes=chain_peak,
        compute=ledger.compute,
        forward_runs=tuple(ledger.runs),
    )


def schedule_ops(tree: Segment) -> list[dict[str, Any]]:
    """The execution order as readable ops (:func:`memprop.plan.actions.readable`): ``forward``
    (``keep`` is ``"tape"`` for a stage run normally, ``"checkpoint"`` inside a checkpointed
    segment; ``run`` counts that stage's forward runs, 1 for the first) and ``backward``."""
    return readable(actions_of(tree))


def kept_at_top(tree: Segment) -> set[int]:
    """The stages whose tape the first forward keeps."""
    return {c for c in tree.children if isinstance(c, int)}
