"""What recomputation costs: the planner's three cost models.

- ``roofline`` (the default): an op costs its FLOPs at this machine's measured matmul rate plus
  the bytes it reads and writes at its measured copy rate, ``t = flops / F + bytes / B``, plus
  what a pointwise op takes beyond its bytes on a CPU. It prices what FLOPs alone call free
  (ReLU, BatchNorm, pooling, softmax: memory-bound work that takes most of a recomputation's
  time on a CPU), and it is the same on every run of one machine: the rates and timings are
  measured once and cached (``memprop.calibration``).
- ``flops``: counted floating-point operations (``torch.utils.flop_counter``'s formulas): the
  same plan on every machine, blind to memory-bound work.
- ``measured``: the stages' own times on real steps (a real trace; timings vary from run to
  run, so plans may too).
"""

from __future__ import annotations

from memprop.errors import UsageError

__all__ = ["COST_MODELS", "DEFAULT_COST_MODEL", "check_cost_model", "on_fake_tensors"]

COST_MODELS: tuple[str, ...] = ("roofline", "flops", "measured")
DEFAULT_COST_MODEL = "roofline"


def on_fake_tensors(cost_model: str) -> str:
    """The cost model a fake trace prices by in place of ``cost_model``: ``measured`` needs
    real steps' times, which later shapes (planned on fake tensors) do not have."""
    return DEFAULT_COST_MODEL if cost_model == "measured" else cost_model


def check_cost_model(cost_model: str, *, fake: bool = False) -> None:
    """The one check of a cost model (every entry point calls it before tracing): its name, and
    on ``fake`` tensors that it can price them."""
    if cost_model not in COST_MODELS:
        raise UsageError(f"cost model {cost_model!r} does not exist: use one of "
                         f"{', '.join(COST_MODELS)}")
    if fake and cost_model == "measured":
        raise UsageError("cost model 'measured' needs the times of real steps, which fake "
                         "tensors do not have: price by roofline or flops on fake tensors, or "
                         "plan on real tensors")
