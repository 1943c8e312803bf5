"""The schedule form: a plan as the sequence of actions a training step performs on its stages.

A plan tree (:class:`memprop.plan.schedule.Segment`) says *what* is checkpointed; its schedule
says *when* each thing happens, one action after another, in execution order:

- :class:`Run`: one forward of one stage. ``keep`` says what it leaves for its backward: its
  whole tape (``TAPE``, a stage run normally, or a re-run inside the backward), nothing
  (``NOTHING``, inside a checkpoint), or a selective option's op outputs (``SELECTED``, a
  one-stage checkpoint under ``Stage.options``). A re-run of a selective checkpoint is a
  ``TAPE`` run that starts from those outputs (``option``).
- :class:`Checkpoint`: a checkpoint opens on stages ``[start, stop)``: it stores its input (and
  the generators' state when a stage draws random numbers) until :class:`Release`.
- :class:`Loss`: the forward is over; the loss runs and leaves its gradient for the backward.
- :class:`Rerun` and :class:`RerunDone`: the backward reached a checkpoint; its stages run again
  (the actions between the two) and the recomputed output is dropped.
- :class:`Backward`: one stage's backward.
- :class:`Release`: a checkpoint's backward is over; it lets go of its input and state.

One memory model folds over this sequence (:class:`memprop.plan.memory.Ledger`): the simulator
prices a plan with it, the dynamic programs price their units with it, the JSON's ``schedule``
lists its runs and backwards. A new kind of action (an activation offloaded to the host and
fetched back, a stage computed in chunks) is a new class here, its place in :func:`actions_of`,
and its fold in the ledger.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memprop.plan.schedule import Segment

__all__ = ["Action", "Backward", "Checkpoint", "Keep", "Loss", "Release", "Rerun", "RerunDone",
           "Run", "actions_of", "readable"]


class Keep(enum.Enum):
    """What a stage's forward leaves for its backward."""

    TAPE = "tape"
    """Everything it saves."""
    NOTHING = "checkpoint"
    """Nothing: it runs inside a checkpoint, which re-runs it when the backward needs it."""
    SELECTED = "selective"
    """The op outputs of a selective option, held until its re-run."""


@dataclass(frozen=True, slots=True)
class Run:
    """A forward of stage ``stage``."""

    stage: int
    keep: Keep
    option: int = 0
    """With ``SELECTED``, the option (``Stage.options``, from 1) whose outputs it keeps; with
    ``TAPE``, the option whose kept outputs this re-run starts from (0: none)."""


@dataclass(frozen=True, slots=True)
class _OnCheckpoint:
    """An action on the checkpoint of stages ``[start, stop)``."""

    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class Checkpoint(_OnCheckpoint):
    """A checkpoint of stages ``[start, stop)`` opens: its input and state stored."""


@dataclass(frozen=True, slots=True)
class Loss:
    """The loss between the forward and the backward."""


@dataclass(frozen=True, slots=True)
class Rerun(_OnCheckpoint):
    """The backward reaches the checkpoint of ``[start, stop)``: its re-run begins, from the op
    outputs of selective ``option`` if any."""

    option: int = 0


@dataclass(frozen=True, slots=True)
class RerunDone(_OnCheckpoint):
    """The re-run's forward of ``[start, stop)`` is over: its recomputed output is dropped."""


@dataclass(frozen=True, slots=True)
class Backward:
    """The backward of stage ``stage``."""

    stage: int


@dataclass(frozen=True, slots=True)
class Release(_OnCheckpoint):
    """The checkpoint of ``[start, stop)`` lets go of its input and state."""


Action = Run | Checkpoint | Loss | Rerun | RerunDone | Backward | Release


def actions_of(tree: Segment) -> Iterator[Action]:
    """The schedule of ``tree``: its first forward, the loss, then its backward, with each
    checkpoint re-run by its own children when the backward reaches it. A generator: a deep
    tree's schedule is long (NOTE [ Planning time linear in depth ] in ``solvers``)."""
    yield from _forward(tree)
    yield Loss()
    yield from _backward(tree)


def _forward(segment: Segment, option: int = 0) -> Iterator[Action]:
    for child in segment.children:
        if isinstance(child, int):
            yield Run(child, Keep.TAPE, option)
        else:
            yield Checkpoint(child.start, child.stop)
            if child.option:
                yield Run(child.start, Keep.SELECTED, child.option)
            else:
                yield from (Run(i, Keep.NOTHING) for i in range(child.start, child.stop))


def _backward(segment: Segment) -> Iterator[Action]:
    for child in reversed(segment.children):
        if isinstance(child, int):
            yield Backward(child)
        else:
            yield Rerun(child.start, child.stop, child.option)
            yield from _forward(child, child.option)
            yield RerunDone(child.start, child.stop)
            yield from _backward(child)
            yield Release(child.start, child.stop)


def readable(actions: Iterator[Action]) -> list[dict[str, Any]]:
    """The JSON's ``schedule``: each forward (``keep``: ``"tape"`` for a stage run normally or
    re-run, ``"checkpoint"`` inside a checkpoint; ``run`` counts that stage's forward runs, 1
    for the first) and each backward, in execution order."""
    runs: dict[int, int] = {}
    ops: list[dict[str, Any]] = []
    for action in actions:
        if isinstance(action, Run):
            runs[action.stage] = runs.get(action.stage, 0) + 1
            keep = "tape" if action.keep is Keep.TAPE else "checkpoint"
            ops.append({"op": "forward", "stage": action.stage, "keep": keep,
                        "run": runs[action.stage]})
        elif isinstance(action, Backward):
            ops.append({"op": "backward", "stage": action.stage})
    return ops
