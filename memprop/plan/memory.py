"""The one memory model: a ledger that folds over a schedule's actions to price memory and time.

Each action of the schedule form (:mod:`memprop.plan.actions`) changes the live bytes as NOTE
[ The memory model ] in :mod:`memprop.plan.chain` says, and its worst moment is recorded. The
simulator (:func:`memprop.plan.schedule.simulate`) folds a whole plan's schedule; the dynamic
programs (:mod:`memprop.plan._dp`) fold each unit's own short schedules (kept, run without
tapes, re-run under a selective option) from the context a sub-problem sees, so the moments the
tables add up are the ones the simulator finds. Nothing else walks the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from memprop.plan.actions import (
    Action,
    Backward,
    Checkpoint,
    Keep,
    Loss,
    Release,
    Rerun,
    RerunDone,
    Run,
)
from memprop.plan.chain import Chain

__all__ = ["Ledger"]


class Ledger:
    """Live bytes over a schedule: reference-counted activation storages, plain byte counts for
    tapes, gradients and generators' states; the worst moment so far, the compute so far."""

    def __init__(self, chain: Chain, *, forward_margin: int = 0, holds_locals: bool = True
                 ) -> None:
        """``forward_margin`` is added to every forward moment and ``holds_locals`` off stops
        first runs from holding the forward's locals: the dynamic programs' safe charge for the
        locals at every forward, re-runs included, where the simulator holds each stage's from
        its first run to the loss (exact)."""
        self.chain = chain
        self.refs = [0] * (len(chain) + 1)
        self.live = 0
        """Bytes live now, ``fixed_bytes`` apart."""
        self.peak = 0
        """The worst moment so far, ``fixed_bytes`` apart."""
        self.runs = [0] * len(chain)
        self.compute = 0.0
        self.locals_live = 0
        """The forward's locals that first runs left alive (NOTE [ The memory model ])."""
        self.forward_margin, self.holds_locals = forward_margin, holds_locals
        self._fold: dict[type, Callable[[Any], None]] = {
            Run: self._run, Checkpoint: self._checkpoint, Loss: self._loss,
            Rerun: self._rerun, RerunDone: self._rerun_done, Backward: self._backward,
            Release: self._release,
        }

    def fold(self, actions: Iterable[Action]) -> Ledger:
        """Apply ``actions`` in order; the ledger itself, for chaining."""
        fold = self._fold
        for action in actions:
            fold[type(action)](action)
        return self

    def moment(self, extra: int) -> None:
        self.peak = max(self.peak, self.live + extra)

    def hold(self, j: int) -> None:
        """One more holder of ``x_j``'s storage."""
        root = self.chain.storage_of(j)
        self.refs[root] += 1
        if self.refs[root] == 1:
            self.live += self.chain.storage_bytes(root)

    def release(self, j: int) -> None:
        """One holder fewer of ``x_j``'s storage."""
        root = self.chain.storage_of(j)
        self.refs[root] -= 1
        if self.refs[root] == 0:
            self.live -= self.chain.storage_bytes(root)

    def holds(self, j: int) -> bool:
        """Whether anyone holds ``x_j``'s storage."""
        return self.refs[self.chain.storage_of(j)] > 0

    def _run(self, action: Run) -> None:
        # Entered with a flow reference on x_i; leaves one on x_{i+1}.
        i, chain = action.stage, self.chain
        stage = chain.stages[i]
        rerun = chain.stages[i].options[action.option - 1] if (
            action.option and action.keep is Keep.TAPE) else None
        self.moment(chain.forward_moment_bytes(i, rerun) + self.forward_margin)
        self.runs[i] += 1
        self.compute += stage.forward_cost
        if self.runs[i] == 1 and self.holds_locals:
            self.live += stage.forward_held_bytes
            self.locals_live += stage.forward_held_bytes
        self.hold(i + 1)
        if action.keep is Keep.TAPE:
            self.live += stage.tape_bytes
            if stage.saves_input:
                self.hold(i)
            if stage.saves_output:
                self.hold(i + 1)
        elif action.keep is Keep.SELECTED:
            self.live += stage.options[action.option - 1].cache_bytes
        self.release(i)

    def _checkpoint(self, action: Checkpoint) -> None:
        self.hold(action.start)  # the checkpoint's stored input
        self.live += self.chain.stash_bytes(action.start, action.stop)

    def _loss(self, action: Loss) -> None:
        # The flow reference on x_n becomes the caller's: it holds the output until the step
        # ends. The forward's own locals go as it returns.
        self.live -= self.locals_live
        self.locals_live = 0
        self.moment(self.chain.loss_moment_bytes())
        self.live += self.chain.loss_left_bytes()

    def _rerun(self, action: Rerun) -> None:
        self.hold(action.start)  # the recompute's flow
        # fork_rng's copy of the state to put back, live through the re-run's forward
        self.live += self.chain.stash_bytes(action.start, action.stop)
        if action.option:  # the kept outputs become the re-run's tape
            option = self.chain.stages[action.start].options[action.option - 1]
            self.live -= option.cache_bytes
            self.compute -= option.saved_cost

    def _rerun_done(self, action: RerunDone) -> None:
        self.live -= self.chain.stash_bytes(action.start, action.stop)
        self.release(action.stop)  # the recomputed output is dropped

    def _backward(self, action: Backward) -> None:
        # Entered with d_{i+1} live; leaves d_i live.
        i, chain = action.stage, self.chain
        stage = chain.stages[i]
        self.moment(chain.backward_moment_bytes(i))
        self.compute += stage.backward_cost
        self.live -= stage.tape_bytes
        if stage.saves_input:
            self.release(i)
        if stage.saves_output:
            self.release(i + 1)
        self.live += chain.act_bytes(i) - chain.freed_grad_bytes(i) + stage.gradient_bytes

    def _release(self, action: Release) -> None:
        self.release(action.start)  # the checkpoint lets go of its input
        self.live -= self.chain.stash_bytes(action.start, action.stop)  # and of the state
