"""Models wrapped by ``torch.compile``: traced as their original, eager module.

NOTE [ Compiled models are traced eagerly ]
``torch.compile(model)`` returns an ``OptimizedModule`` whose forward runs what inductor
generated: kernels that fake tensors cannot run (they mixed the real and the fake: "cpu and
meta"), and buffers that no dispatch mode sees. Until memprop traces compiled steps (AOTAutograd's
graphs), it traces the module that ``torch.compile`` wrapped (``_orig_mod``, the same parameters)
eagerly, and says so: the figures are the eager step's, which a compiled step may lower (fused
kernels save fewer intermediates) or raise (graph buffers).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["COMPILED_NOTE", "eager_model", "original"]

COMPILED_NOTE = ("the model is torch.compile'd: the eager step of its original module was "
                 "traced, not the compiled one (memprop does not trace compiled steps yet)")


def original(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (through every layer of wrapping), or ``model``."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing is compiled
    compiled = getattr(dynamo, "OptimizedModule", None)
    while compiled is not None and isinstance(model, compiled):
        model = model._orig_mod
    return model


@contextlib.contextmanager
def eager_model(workload: Any, notes: list[str]) -> Iterator[None]:
    """Within the block, ``workload.model`` is its original module when it is compiled (NOTE
    [ Compiled models are traced eagerly ]), and ``notes`` says so."""
    compiled = workload.model
    plain = original(compiled)
    if plain is compiled:
        yield
        return
    notes.append(COMPILED_NOTE)
    workload.model = plain
    try:
        yield
    finally:
        workload.model = compiled
