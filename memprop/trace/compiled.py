"""Models wrapped by ``torch.compile``: their compiled step traced from AOTAutograd's graphs.

NOTE [ Compiled models are traced eagerly ]
``torch.compile(model)`` returns an ``OptimizedModule`` whose forward runs what inductor
generated: kernels that fake tensors cannot run, and buffers that no dispatch mode sees. A
profile's training step traces the graphs that the compiled step runs instead
(:func:`compiled_step`, NOTE [ Tracing a compiled step ] in ``memprop.trace.aot``): the saved
activations are the partitioner's, exactly, and the temporaries inside the graphs an upper
bound. Where that cannot be done (a graph break, dynamic shapes, a backend other than
inductor), and for what runs eagerly under a plan (planning traces, the inference pass), the
module that ``torch.compile`` wrapped (``_orig_mod``, the same parameters) is traced eagerly,
and the report says so. A compiled step planned as such (``memprop.plan.compiled``: the
partitioner's activation memory budget and the head option chosen for a peak budget) is
traced from its graphs too, each candidate on fake tensors.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

from memprop.trace.aot import CapturedGraphs, capture_step, fused_away_bytes, suspended_modes
from memprop.units import format_bytes

__all__ = ["COMPILED_BLOCKS_NOTE", "COMPILED_GRAPHS_NOTE", "COMPILED_NOTE", "compiled_step",
           "eager_model", "measured_compiled_step", "original", "step_as_traced"]

COMPILED_NOTE = ("the model is torch.compile'd: the eager step of its original module was "
                 "traced, not the compiled one")

COMPILED_GRAPHS_NOTE = ("the model is torch.compile'd: the training step was traced from the "
                        "graphs inductor compiles")

COMPILED_BLOCKS_NOTE = ("a compiled step runs graphs, not modules: its blocks are found, and "
                        "planned, on the eager module (memprop plan)")


def original(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (through every layer of wrapping), or ``model``."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing is compiled
    compiled = getattr(dynamo, "OptimizedModule", None)
    while compiled is not None and isinstance(model, compiled):
        model = model._orig_mod
    return model


@contextlib.contextmanager
def eager_model(workload: Any, notes: list[str], why: str = "") -> Iterator[None]:
    """Within the block, ``workload.model`` is its original module when it is compiled (NOTE
    [ Compiled models are traced eagerly ]), and ``notes`` says so (and ``why``)."""
    compiled = workload.model
    plain = original(compiled)
    if plain is compiled:
        yield
        return
    notes.append(f"{COMPILED_NOTE} ({why})" if why else COMPILED_NOTE)
    workload.model = plain
    try:
        yield
    finally:
        workload.model = compiled


class InductorGraphs(nn.Module):
    """The workload's model while a compiled step is traced (reports name it as the module
    that made the graphs' storages; not exported): calls the graphs' compiled module
    outside the dispatch modes (NOTE [ Tracing a compiled step ]); its parameters and buffers
    are the original's. The original is not a submodule, so that no hook is put on its
    children (dynamo guards on them, and the graphs run no module)."""

    _plain: nn.Module
    _compiled: Any
    graphs: CapturedGraphs
    users: nn.Module
    """The user's compiled model (inductor's code), which the allocator measures."""

    def __init__(self, plain: nn.Module, compiled: Any, graphs: CapturedGraphs,
                 users: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_plain", plain)
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "graphs", graphs)
        object.__setattr__(self, "users", users)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with suspended_modes(self.graphs):
            return self._compiled(*args, **kwargs)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:
        return self._plain.named_parameters(*args, **kwargs)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Any:
        return self._plain.named_buffers(*args, **kwargs)


def _untraceable(compiled: nn.Module) -> str | None:
    """Why the compiled step of ``compiled`` cannot be traced from inductor's graphs, or None."""
    import torch

    context = getattr(compiled, "dynamo_ctx", None)
    if getattr(context, "_dynamic", None):
        return "compiled with dynamic=True: memprop traces graphs of static shapes"
    backend: Any = getattr(context, "callback", None)
    while hasattr(backend, "_torchdynamo_orig_backend"):
        backend = backend._torchdynamo_orig_backend
    if not isinstance(backend, torch._TorchCompileInductorWrapper):
        return (f"its backend is {getattr(backend, '__name__', type(backend).__name__)}, not "
                "inductor: memprop traces inductor's graphs")
    return None


@contextlib.contextmanager
def compiled_step(workload: Any, notes: list[str]) -> Iterator[CapturedGraphs | None]:
    """Within the block, a compiled ``workload.model`` runs AOTAutograd's graphs under the
    active modes (NOTE [ Tracing a compiled step ] in ``memprop.trace.aot``), and the graphs
    are given; or, when they cannot be traced, its original module eagerly, and None (NOTE
    [ Compiled models are traced eagerly ]). A model that is not compiled is left as it is."""
    compiled = workload.model
    plain = original(compiled)
    if plain is compiled:
        yield None
        return
    why = _untraceable(compiled)
    graphs = None
    if why is None:
        try:
            stepper, graphs = capture_step(plain, tuple(workload.inputs),
                                           dict(workload.keywords))
        except Exception as error:  # dynamo's and the partitioner's refusals, said in the note
            why = f"torch.compile(fullgraph=True) refused it: {_first_line(error)}"
        else:
            why = _incomplete(graphs)
    if why is not None or graphs is None:
        with eager_model(workload, notes, why or ""):
            yield None
        return
    notes.append(_graphs_note(graphs))
    workload.model = InductorGraphs(plain, stepper, graphs, compiled)
    try:
        yield graphs
    finally:
        workload.model = compiled


def step_as_traced(workload: Any, notes: list[str], *, planning: bool, create_graph: bool
                   ) -> contextlib.AbstractContextManager[CapturedGraphs | None]:
    """How a training step of ``workload`` is traced: a compiled model from its graphs
    (:func:`compiled_step`), but eagerly for planning (plans run the eager module) and for a
    backward that keeps its graph (compiled steps have no double backward)."""
    if planning:
        return eager_model(workload, notes)
    if create_graph:
        return eager_model(workload, notes, "create_graph=True: a compiled step has no double "
                                            "backward")
    return compiled_step(workload, notes)


def measured_compiled_step(workload: Any, device: Any) -> int:
    """The peak of one real step of the user's compiled model (inductor's code, outside every
    dispatch mode) by ``device``'s count (the allocator's): what the traced graphs predict.
    ``workload.model`` is the :func:`compiled_step` block's. A forward compiles it first; the
    gradients are zeroed as the loop zeroes them. A real step: it trains the model, as the
    traced ones do."""
    import torch._functorch.config as functorch_config

    from memprop.loop import training_step, zero_gradients

    graph_step = workload.model
    workload.model = graph_step.users
    try:
        # The compile (forward and backward) before the measured step, not inside it.
        with functorch_config.patch(force_non_lazy_backward_lowering=True):
            workload.forward()
        zero_gradients(workload)
        before = device.current_bytes()
        device.reset_peak()
        training_step(workload)
        return max(0, int(device.peak_bytes()) - int(before))
    finally:
        workload.model = graph_step


def _graphs_note(graphs: CapturedGraphs) -> str:
    """Which figures of a step traced from ``graphs`` are exact and which are modelled, with
    the saved bytes and how far the model of fusion can be off (NOTE [ What inductor fuses ])."""
    assert graphs.forward is not None and graphs.backward is not None
    bound = max(fused_away_bytes(graphs.forward), fused_away_bytes(graphs.backward))
    return (f"{COMPILED_GRAPHS_NOTE} (AOTAutograd's partitioned forward and backward, run op "
            "by op). Exact: parameters, gradients, optimizer state, inputs and the saved "
            f"activations, what the partitioner keeps for backward "
            f"({format_bytes(graphs.saved_bytes)} in {len(graphs.saved_activations)} tensors). "
            "Modelled: the temporaries inside each graph, "
            "as inductor fuses them (a pointwise result read only by pointwise ops and "
            "reductions is never stored); stored op by op, they would add at most "
            f"{format_bytes(bound)} to the peak. The inference pass is the eager module's")


def _incomplete(graphs: CapturedGraphs) -> str | None:
    if graphs.forward is None or graphs.backward is None or graphs.forward_runs != 1:
        return "no training graphs were compiled (nothing in the forward needs a gradient?)"
    extra = len(graphs.forward_outputs) - graphs.user_outputs - len(graphs.saved_values)
    if extra:
        return (f"its forward graph returns {extra} outputs beyond the model's and the saved "
                "ones (inputs it mutates, such as BatchNorm's running statistics)")
    return None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"[:300]
