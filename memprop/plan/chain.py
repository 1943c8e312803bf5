"""The chain the planner sees, and its memory model.

A chain is stages ``0..n-1`` run in order, as the children of an ``nn.Sequential``. Write ``x_j``
for the activation between stage ``j-1`` and stage ``j`` (``x_0`` is the model's input, already in
``fixed_bytes``, so it weighs 0 here; ``x_{j+1}`` weighs ``stages[j].output_bytes``) and ``d_j``
for its gradient, the same size. Stage ``i``'s input is taken to be stage ``i-1``'s output (one
storage), so ``input_bytes`` is informational.

# NOTE [ The memory model ]
The live bytes at any moment are ``fixed_bytes`` plus the sum of these storages, each counted once
however many holders share it (the simulator keeps a reference count per ``x_j``):

- ``x_j`` is live while anyone holds it: the stage producing it, until the next one has run
  (the "flow"); stage ``j`` when it is run normally and ``saves_input``; stage ``j-1`` when it is
  run normally and ``saves_output``; a checkpointed segment that starts at ``j`` (its stored
  input) until its backward is over. So a ReLU that saves its output and a Linear after it that
  saves its input share one storage, and a checkpoint's input is the previous stage's output.
- A stage run normally keeps its private tape, ``saved_bytes`` less its output when
  ``saves_output`` (the output is counted as ``x_{i+1}`` above), from its forward to its backward.
  A stage run inside a checkpoint keeps nothing: ``torch.utils.checkpoint(use_reentrant=False)``
  drops the saved tensors and keeps only the segment's input.
- Gradients: after the loss, ``d_n`` is live; stage ``i``'s backward holds ``d_{i+1}``, produces
  ``d_i`` (none for stage 0: the model's input needs no gradient) and then frees ``d_{i+1}``, its
  tape and its holds. When backward reaches a checkpointed segment ``[a, s)``, ``d_s`` is live while
  the segment is re-run (by its own inner plan, which may hold further checkpoints) and then
  differentiated.
- Transients: the moment of a stage's forward is the live total when it began plus
  ``max(forward_peak_bytes, output + tape)``; of its backward, the live total when it began
  (which holds ``d_{i+1}``) plus ``max(backward_peak_bytes, d_i)``. The clamps keep the model
  coherent for stats that under-report (the moment after an op never exceeds the moment during it).
- The loss sits between the last forward and the first backward: its moment holds ``x_n`` and
  ``d_n`` together. Its own small temporaries are outside the chain.

The peak of a schedule is ``fixed_bytes`` plus the largest of these moments. The same model drives
the simulator (:func:`memprop.plan.schedule.simulate`, an event walk) and the dynamic programs
(:mod:`memprop.plan._dp`, a recursion over the same moments); the tests hold them equal.

Known limitations: stages with several inputs or outputs, or whose output aliases their input
(in-place ops), are outside the model; the loss head's memory is assumed small or in
``fixed_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from memprop.errors import UsageError
from memprop.trace.stages import StageStats

__all__ = ["Chain", "Stage"]

CostModel = Literal["measured", "flops"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Stage:
    """One link of the chain, in the units the planner prices it."""

    name: str
    """The stage's qualified module name (``layers.3``)."""
    forward_cost: float
    """Cost of one forward run (seconds or FLOPs, per ``Chain.cost_unit``)."""
    backward_cost: float
    """Cost of the backward."""
    input_bytes: int
    """The stage's input activation (informational: the model uses the previous output)."""
    output_bytes: int
    """The stage's output activation; its gradient has the same size."""
    saved_bytes: int
    """What the stage saves for backward, its input excluded, its output included when
    ``saves_output``."""
    saves_input: bool
    """Whether the backward needs the stage's input (kept alive while the tape is)."""
    saves_output: bool
    """Whether the output's storage is among ``saved_bytes``."""
    forward_peak_bytes: int
    """Transient of the forward above the live total when it began."""
    backward_peak_bytes: int
    """Transient of the backward above the live total when it began."""

    @property
    def tape_bytes(self) -> int:
        """The saved bytes that are neither the input nor the output."""
        return max(0, self.saved_bytes - (self.output_bytes if self.saves_output else 0))


@dataclass(frozen=True, kw_only=True, slots=True)
class Chain:
    """The planner's problem: stages, the bytes under every moment and the unit of cost."""

    stages: tuple[Stage, ...]
    """The stages, in execution order."""
    fixed_bytes: int = 0
    """Bytes live at every moment: parameters, gradients, optimizer state, inputs."""
    cost_unit: Literal["s", "flops"] = "s"
    """What ``forward_cost`` and ``backward_cost`` count."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise UsageError("a chain needs at least one stage: the model has no children to plan")
        for stage in self.stages:
            sizes = (stage.output_bytes, stage.saved_bytes, stage.forward_peak_bytes,
                     stage.backward_peak_bytes, stage.input_bytes)
            if min(sizes) < 0 or stage.forward_cost < 0 or stage.backward_cost < 0:
                raise UsageError(f"stage {stage.name!r} has a negative size or cost: {stage}")
        if self.fixed_bytes < 0:
            raise UsageError(f"fixed_bytes is {self.fixed_bytes}: give a number of bytes >= 0")

    def __len__(self) -> int:
        return len(self.stages)

    def act_bytes(self, j: int) -> int:
        """Size of ``x_j`` (and of ``d_j``); ``x_0`` lives in ``fixed_bytes`` and weighs 0."""
        return 0 if j == 0 else self.stages[j - 1].output_bytes

    def forward_moment_bytes(self, i: int) -> int:
        """What stage ``i``'s forward adds, at its worst, to the live total when it began."""
        stage = self.stages[i]
        return max(stage.forward_peak_bytes, stage.output_bytes + stage.tape_bytes)

    def backward_moment_bytes(self, i: int) -> int:
        """What stage ``i``'s backward adds, at its worst, to the live total when it began."""
        return max(self.stages[i].backward_peak_bytes, self.act_bytes(i))

    @classmethod
    def from_stage_stats(
        cls,
        stats: Sequence[StageStats],
        *,
        fixed_bytes: int,
        cost_model: CostModel = "measured",
    ) -> Chain:
        """The chain of a traced step: ``"measured"`` prices stages in seconds, ``"flops"`` in
        counted floating-point operations (the same plan on every machine)."""
        if cost_model not in ("measured", "flops"):
            raise UsageError(
                f"cost model {cost_model!r} does not exist: use 'measured' or 'flops'"
            )
        stages = tuple(
            Stage(
                name=s.name,
                forward_cost=float(s.flops if cost_model == "flops" else s.forward_s),
                backward_cost=float(s.backward_flops if cost_model == "flops" else s.backward_s),
                input_bytes=s.input_bytes,
                output_bytes=s.output_bytes,
                saved_bytes=s.saved_bytes,
                saves_input=s.saves_input,
                saves_output=s.saves_output,
                forward_peak_bytes=s.forward_peak_bytes,
                backward_peak_bytes=s.backward_peak_bytes,
            )
            for s in sorted(stats, key=lambda s: s.index)
        )
        return cls(
            stages=stages,
            fixed_bytes=fixed_bytes,
            cost_unit="flops" if cost_model == "flops" else "s",
        )
