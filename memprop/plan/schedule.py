"""Plans as trees that nested ``torch.utils.checkpoint`` executes, and their simulator.

A :class:`Segment` covers stages ``[start, stop)``. Its children, in order, partition that range:
an ``int`` is a stage run normally (its tape kept until its backward); a nested ``Segment`` is
checkpointed (only its input stored; when backward reaches it, it is re-run by its own children
and then differentiated). The runtime turns a Segment into an ``nn.Sequential`` whose checkpointed
children are wrapped in ``checkpoint(..., use_reentrant=False)``, recursively.

Example, 4 stages, stages 0-1 checkpointed, 2 and 3 kept::

    Segment(start=0, stop=4, children=(Segment(start=0, stop=2, children=(0, 1)), 2, 3))

:func:`simulate` walks the execution order under the memory model of :mod:`memprop.plan.chain`
and is the single source of truth for a plan's peak and compute.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Union

from memprop.plan.chain import Chain
from memprop.plan.selective import Option

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


class _Ledger:
    """Reference-counted activation storages, plus plain byte counts for tapes and gradients."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.refs = [0] * (len(chain) + 1)
        self.live = 0
        self.peak = 0
        self.runs = [0] * len(chain)
        self.compute = 0.0
        self.rerun: Option | None = None
        """The selective option whose re-run is under way: its kept outputs are its tape."""

    def moment(self, extra: int) -> None:
        self.peak = max(self.peak, self.live + extra)

    def hold(self, j: int) -> None:
        root = self.chain.storage_of(j)
        self.refs[root] += 1
        if self.refs[root] == 1:
            self.live += self.chain.storage_bytes(root)

    def release(self, j: int) -> None:
        root = self.chain.storage_of(j)
        self.refs[root] -= 1
        if self.refs[root] == 0:
            self.live -= self.chain.storage_bytes(root)

    def forward(self, seg: Segment) -> None:
        # Entered with a flow reference on x_start; leaves one on x_stop.
        for child in seg.children:
            if isinstance(child, int):
                self._run(child, keep=True)
            else:
                self.hold(child.start)  # the checkpoint's stored input
                self.live += self.chain.stash_bytes(child.start, child.stop)
                for i in range(child.start, child.stop):
                    self._run(i, keep=False)
                option = self.chain.option_of(child)
                self.live += 0 if option is None else option.cache_bytes

    def _run(self, i: int, *, keep: bool) -> None:
        stage = self.chain.stages[i]
        self.moment(self.chain.forward_moment_bytes(i, self.rerun))
        self.runs[i] += 1
        self.compute += stage.forward_cost
        if self.runs[i] == 1:
            self.live += stage.forward_held_bytes
        self.hold(i + 1)
        if keep:
            self.live += stage.tape_bytes
            if stage.saves_input:
                self.hold(i)
            if stage.saves_output:
                self.hold(i + 1)
        self.release(i)

    def backward(self, seg: Segment) -> None:
        # Entered with d_stop live; leaves d_start live.
        for child in reversed(seg.children):
            if isinstance(child, int):
                stage = self.chain.stages[child]
                self.moment(self.chain.backward_moment_bytes(child))
                self.compute += stage.backward_cost
                self.live -= stage.tape_bytes
                if stage.saves_input:
                    self.release(child)
                if stage.saves_output:
                    self.release(child + 1)
                self.live += self.chain.act_bytes(child) - self.chain.freed_grad_bytes(child)
                self.live += stage.gradient_bytes
            else:
                self.hold(child.start)  # the recompute's flow
                # fork_rng's copy of the state to put back, live through the re-run's forward
                stash = self.chain.stash_bytes(child.start, child.stop)
                self.live += stash
                self.rerun = self.chain.option_of(child)
                if self.rerun is not None:  # the kept outputs become the re-run's tape
                    self.live -= self.rerun.cache_bytes
                    self.compute -= self.rerun.saved_cost
                self.forward(child)
                self.live -= stash
                self.rerun = None
                self.release(child.stop)  # the recomputed output is dropped
                self.backward(child)
                self.release(child.start)  # the checkpoint lets go of its input
                self.live -= stash  # and of the generators' state


def simulate(chain: Chain, tree: Segment) -> Simulation:
    """Execute ``tree`` on paper: the peak (``fixed_bytes`` and the optimizer's moment included)
    and the total compute."""
    n = len(chain)
    if tree.start != 0 or tree.stop != n:
        raise ValueError(f"the plan covers {tree.start}..{tree.stop}, the chain 0..{n}")
    ledger = _Ledger(chain)
    ledger.hold(0)
    ledger.forward(tree)
    # The flow reference on x_n becomes the caller's: it holds the output until the step ends.
    # The forward's own locals go as it returns.
    ledger.live -= chain.forward_held_total()
    ledger.moment(chain.loss_moment_bytes())
    ledger.live += chain.loss_left_bytes()
    ledger.backward(tree)
    chain_peak = chain.fixed_bytes + ledger.peak
    return Simulation(
        peak_bytes=max(chain_peak, chain.optimizer_peak_bytes),
        chain_peak_bytes=chain_peak,
        compute=ledger.compute,
        forward_runs=tuple(ledger.runs),
    )


def schedule_ops(tree: Segment) -> list[dict[str, Any]]:
    """The execution order as readable ops: ``forward`` (``keep`` is ``"tape"`` for a stage run
    normally, ``"checkpoint"`` inside a checkpointed segment; ``run`` counts that stage's forward
    runs, 1 for the first) and ``backward``."""
    runs: dict[int, int] = {}
    ops: list[dict[str, Any]] = []

    def fwd(i: int, keep: str) -> dict[str, Any]:
        runs[i] = runs.get(i, 0) + 1
        return {"op": "forward", "stage": i, "keep": keep, "run": runs[i]}

    def forward(seg: Segment) -> Iterator[dict[str, Any]]:
        for child in seg.children:
            if isinstance(child, int):
                yield fwd(child, "tape")
            else:
                yield from (fwd(i, "checkpoint") for i in range(child.start, child.stop))

    def backward(seg: Segment) -> Iterator[dict[str, Any]]:
        for child in reversed(seg.children):
            if isinstance(child, int):
                yield {"op": "backward", "stage": child}
            else:
                yield from forward(child)
                yield from backward(child)

    ops.extend(forward(tree))
    ops.extend(backward(tree))
    return ops


def kept_at_top(tree: Segment) -> set[int]:
    """The stages whose tape the first forward keeps."""
    return {c for c in tree.children if isinstance(c, int)}
