"""Per-stage costs: what the planner needs to know about each link of the chain."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ChainCosts", "StageStats"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StageStats:
    """One stage of the chain (a child of the model's ``nn.Sequential``), as one traced training
    step saw it. Bytes are storage bytes, each storage counted once."""

    index: int
    """Position in the chain, from 0."""
    name: str
    """The stage's qualified module name (``layers.3``)."""
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
    """Parameter gradients born in the stage's backward that outlive it (its ``.grad``s on a
    first step; 0 when they accumulate in place into existing ones)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    output_grad_held: bool = False
    """Whether the gradient of the model's output outlives the last stage's backward (when the
    chain's output is the loss itself, that gradient is the seed that
    ``torch.autograd.backward`` holds until the backward is over)."""
    first_step_peak_bytes: int | None = None
    """The traced training peak of the loop's first step when it was traced apart from the
    steady one (its forward and backward hold less: no optimizer state yet)."""

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["stages"] = [s.to_dict() for s in self.stages]
        return document
