"""Per-stage costs: what the planner needs to know about each link of the chain."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["StageStats"]


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
