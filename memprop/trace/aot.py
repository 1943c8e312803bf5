"""The graphs a ``torch.compile``'d training step runs, captured and run under the ledger.

NOTE [ Tracing a compiled step ]
``torch.compile(model)`` (inductor) runs the model's forward as AOTAutograd's *partitioned*
graphs: a forward graph that returns the user's outputs and, beyond them, the tensors the
min-cut partitioner chose to keep for backward; a backward graph that takes those and the
outputs' gradients and returns the parameters' gradients. The memory of a compiled step is:

- exact, as in eager: parameters, gradients, optimizer state, inputs (the step around the
  graphs is eager), and **the saved activations**: the forward graph's extra outputs, which
  AOTAutograd's runtime keeps with ``ctx.save_for_backward`` (so memprop's saved-tensor hook
  sees them) and releases as the backward graph consumes them (``maybe_clear_saved_tensors``
  and a boxed call, as inductor's code is called);
- modelled: the temporaries inside a graph. inductor fuses pointwise ops into the kernels that
  read them, and their results never reach memory (NOTE [ What inductor fuses ]). Run op by op
  with every result stored, the graphs bound the peak from above (``fused_away_bytes`` says
  by how much at most).

How: the model's original module is compiled again with a backend of memprop's that is
inductor's own ``compile_fx`` (its decompositions, joint-graph passes and partitioner, so the
same graphs and the same saved set) with ``inner_compile`` replaced: instead of generating
code, each partitioned graph is kept and run by ``torch.fx.Interpreter`` (which frees every
value after its last use). ``force_non_lazy_backward_lowering`` makes the backward graph at
compile time. The compile is made by a first call outside every dispatch mode (dynamo skips
frames under a non-infra dispatch mode, and its tensor guards fail under one); at trace time
the compiled call again runs outside the modes, and the graphs run inside them (the ledger, a
fake mode): the runner pushes back the modes the call suspended. The backward graph runs from
the autograd engine, under the modes already.

Known limitations: a graph break, dynamic shapes and a backend other than inductor are traced
eagerly instead (``memprop.trace.compiled``); the inference pass is the eager one. The first
call runs the forward once (on real tensors it computes, and a BatchNorm's running statistics
count it).
"""

from __future__ import annotations

import contextlib
import operator
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["CapturedGraphs", "GraphCapture", "capture_step", "fresh_call", "fused_away",
           "fused_away_bytes", "suspended_modes"]


@dataclass(slots=True)
class CapturedGraphs:
    """AOTAutograd's partitioned graphs of one compiled forward, as inductor would get them."""

    forward: torch.fx.GraphModule | None = None
    backward: torch.fx.GraphModule | None = None
    user_outputs: int = 0
    """How many outputs the model's graph returns (dynamo's graph, before AOTAutograd)."""
    forward_runs: int = 0
    """How many times the forward graph ran (0 after a call means it did not run here)."""
    suspended: list[Any] = field(default_factory=list)
    """The dispatch modes the compiled call suspended, pushed back while its graphs run."""
    fused: bool = True
    """Whether the graphs run as inductor fuses them (NOTE [ What inductor fuses ]); False:
    op by op, every result stored until its last reader (a bound on the fused step's peak)."""

    @property
    def saved_values(self) -> list[torch.fx.Node]:
        """The backward graph's inputs that the forward graph keeps for it: every placeholder
        but the outputs' gradients (``tangents_*``)."""
        if self.backward is None:
            return []
        return [n for n in self.backward.graph.find_nodes(op="placeholder")
                if not str(n.target).startswith("tangents")]

    @property
    def saved_activations(self) -> list[torch.fx.Node]:
        """What the forward graph keeps for backward, parameters and inputs (the graph's own
        inputs) left out, each once: the saved activations."""
        saved = self.forward_outputs[self.user_outputs:]
        return [n for n in dict.fromkeys(saved)
                if isinstance(n, torch.fx.Node) and n.op != "placeholder"]

    @property
    def saved_bytes(self) -> int:
        return sum(_bytes(n) for n in self.saved_activations)

    @property
    def forward_outputs(self) -> list[Any]:
        """The forward graph's outputs, in order: the user's, then what it keeps for backward."""
        if self.forward is None:
            return []
        return _outputs(self.forward)


def _outputs(graph: torch.fx.GraphModule) -> list[Any]:
    returned = graph.graph.output_node().args[0]
    return list(returned) if isinstance(returned, (tuple, list)) else [returned]


class GraphCapture:
    """A dynamo backend: inductor's ``compile_fx`` with the graphs kept and run eagerly (NOTE
    [ Tracing a compiled step ])."""

    def __init__(self) -> None:
        self.graphs = CapturedGraphs()

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self.graphs.user_outputs = len(_outputs(graph))
        kept: Any = self._kept  # returns a runner where compile_fx expects inductor's code
        return compile_fx(graph, example_inputs, inner_compile=kept)

    def _kept(self, graph: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any
              ) -> _GraphRunner:
        backward = bool(kwargs.get("is_backward"))
        if backward:
            self.graphs.backward = graph
        else:
            self.graphs.forward = graph
        return _GraphRunner(graph, self.graphs, backward=backward)


class _GraphRunner:
    """Runs one captured graph op by op, as AOTAutograd calls a compiled graph: boxed (the
    argument list is taken and emptied, so that each input dies after its last use, as in
    inductor's code), under the modes the compiled call suspended; the ops that inductor fuses
    away run outside them (NOTE [ What inductor fuses ])."""

    def __init__(self, graph: torch.fx.GraphModule, graphs: CapturedGraphs, *,
                 backward: bool) -> None:
        # In the instance's own dict: AOTAutograd wraps the backward in torch._dynamo.disable,
        # whose functools.wraps copies the dict, and calls it boxed only if it finds the flag.
        self._boxed_call = True
        self.away = fused_away(graph)
        self.interpreter = _FusingInterpreter(graph, self.away)
        self.graphs = graphs
        self.backward = backward

    # Not traced by dynamo: the ledger's dispatch runs inside, which dynamo cannot trace.
    @torch._dynamo.disable  # type: ignore[untyped-decorator]
    def __call__(self, *args: Any) -> Any:
        boxed = args[0] if len(args) == 1 and isinstance(args[0], list) else list(args)
        if not self.backward:
            self.graphs.forward_runs += 1
        self.interpreter.away = self.away if self.graphs.fused else frozenset()
        try:
            with _pushed(self.graphs.suspended):
                return self.interpreter.boxed_run(boxed)
        finally:
            self.interpreter.env = {}  # it keeps the output node's value: the saved tensors


# NOTE [ What inductor fuses ]
# inductor inlines a pointwise op into the kernel of each op that reads it, when every reader
# is pointwise or a reduction: its result is computed in registers, never stored. It stores
# (realizes) the outputs of the graph, the results of reductions and of the ops it calls
# outside its own kernels (matmuls, convolutions...), and the pointwise results such an op
# reads. A view of a stored result is stored with it. The runner runs a fused-away op outside
# the dispatch modes, so the ledger never sees its storage; its readers see it as an input.
# A result that several kernels read is stored too when inlining it into each would cost much:
# it loads more than 4 stored buffers, runs more than 30 ops, or (on a CPU) an exp, log,
# sigmoid or tanh (inductor's should_realize_on_reuse). This is inductor's rule in a simple
# form: it also splits kernels that grow too large and reorders them, so a real compiled step
# can hold a little more or less than this model. Known limitation: with the partitioner told
# to recompute (torch._functorch.config.activation_memory_budget below 1), the backward graph
# re-runs forward ops whose storage inductor plans differently: the residual MLP of the tests
# at a budget of 0.3 peaked 7% above this model (2,854,104 bytes by the allocator, 2,655,960
# predicted; 0.0% apart at 1.0; 2.7% and 4.0% above at 0.1 and 0.0, 2.1% below at 0.5). Run op
# by op instead (``CapturedGraphs.fused`` False: every result stored until its last reader),
# the same graphs bound the fused step from above, since fusion only removes storages: 14-31%
# above the allocator on that MLP at every budget from 0 to 1. A compiled plan holds that bound
# to its budget (NOTE [ The figure a compiled plan holds to the budget ] in
# memprop.plan.compiled).

def _kind(node: torch.fx.Node) -> str:
    """``pointwise``, ``view``, ``reduction`` or ``stored`` for an op node of an aten graph."""
    target = node.target
    tags = getattr(target, "tags", ())
    if torch.Tag.pointwise in tags:
        return "pointwise"
    if torch.Tag.reduction in tags:
        return "reduction"
    if getattr(target, "is_view", False) or target is operator.getitem:
        return "view"
    return "stored"


def fused_away(graph: torch.fx.GraphModule) -> frozenset[torch.fx.Node]:
    """The pointwise ops and views of ``graph`` whose results inductor never stores (NOTE
    [ What inductor fuses ])."""
    nodes = [n for n in graph.graph.nodes
             if n.op == "call_function" and _kind(n) in ("pointwise", "view")]
    stored: set[torch.fx.Node] = set()
    for node in reversed(nodes):  # readers first: what a reader needs stored
        if any(user.op != "call_function" or _kind(user) == "stored"
               or (user in stored and _kind(user) == "view") for user in node.users):
            stored.add(node)
    heavy = _HEAVY_ON_CPU if _on_cpu(graph) else frozenset()
    inlined: dict[torch.fx.Node, _Inlined] = {}
    for node in nodes:  # then what inductor stores because several kernels would recompute it
        inputs = [inlined.get(n) or _Inlined.stored(n) for n in node.all_input_nodes
                  if n not in stored]
        inputs += [_Inlined.stored(n) for n in node.all_input_nodes if n in stored]
        mine = _Inlined.combine(node, inputs, heavy)
        if node not in stored and len(node.users) > 1 and mine.heavy_when_reused:
            stored.add(node)
        if node not in stored:
            inlined[node] = mine
    return frozenset(inlined)


@dataclass(frozen=True, slots=True)
class _Inlined:
    """What a result inlined into its readers costs each of them: the stored buffers it loads,
    its ops, whether one of them is heavy (inductor's ``should_realize_on_reuse``)."""

    reads: frozenset[torch.fx.Node]
    ops: int
    heavy: bool

    @staticmethod
    def stored(node: torch.fx.Node) -> _Inlined:
        return _Inlined(reads=frozenset((node,)), ops=0, heavy=False)

    @staticmethod
    def combine(node: torch.fx.Node, inputs: list[_Inlined], heavy: frozenset[str]
                ) -> _Inlined:
        reads = frozenset().union(*(i.reads for i in inputs))
        name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        return _Inlined(reads=reads, ops=1 + sum(i.ops for i in inputs),
                        heavy=name in heavy or any(i.heavy for i in inputs))

    @property
    def heavy_when_reused(self) -> bool:
        return (self.heavy or self.ops > _REALIZE_OPCOUNT_THRESHOLD
                or len(self.reads) > _REALIZE_READS_THRESHOLD)


# torch._inductor.config.realize_reads_threshold and _realize_opcount_threshold_default, and the
# ops ir.py's should_realize_on_reuse stores a reused result for on a CPU.
_REALIZE_READS_THRESHOLD = 4
_REALIZE_OPCOUNT_THRESHOLD = 30
_HEAVY_ON_CPU = frozenset(("exp", "log", "log10", "log1p", "log2", "sigmoid", "tanh"))


def _on_cpu(graph: torch.fx.GraphModule) -> bool:
    for node in graph.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return value.device.type == "cpu"
    return True


def _bytes(node: torch.fx.Node) -> int:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return 0
    return int(value.numel()) * value.element_size()


def fused_away_bytes(graph: torch.fx.GraphModule) -> int:
    """The most bytes of pointwise results that inductor never stores (NOTE [ What inductor
    fuses ]) alive at once in ``graph`` were each stored until its last reader: what running
    the graph op by op, with no fusion, could add to the peak (an upper bound on it)."""
    away = {n for n in fused_away(graph) if _kind(n) == "pointwise"}
    last_use: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.graph.nodes:
        for used in node.all_input_nodes:
            last_use[used] = node
    ends: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node, last in last_use.items():
        ends.setdefault(last, []).append(node)
    live = most = 0
    for node in graph.graph.nodes:
        if node in away:
            live += _bytes(node)
            most = max(most, live)
        live -= sum(_bytes(n) for n in ends.get(node, ()) if n in away)
    return most


class _FusingInterpreter(torch.fx.Interpreter):
    def __init__(self, graph: torch.fx.GraphModule, away: frozenset[torch.fx.Node]) -> None:
        super().__init__(graph)
        self.away = away

    def run_node(self, n: torch.fx.Node) -> Any:
        if n not in self.away:
            return super().run_node(n)
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return super().run_node(n)


@contextlib.contextmanager
def _pushed(modes: list[Any]) -> Iterator[None]:
    from torch.utils._python_dispatch import _pop_mode, _push_mode

    for mode in reversed(modes):
        _push_mode(mode)
    try:
        yield
    finally:
        for _ in modes:
            _pop_mode()


@contextlib.contextmanager
def suspended_modes(graphs: CapturedGraphs) -> Iterator[None]:
    """Within the block no dispatch mode is active; the graphs run under the ones suspended."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes() as modes:
        outer, graphs.suspended = graphs.suspended, list(modes)
        try:
            yield
        finally:
            graphs.suspended = outer


def capture_step(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[Callable[..., Any], CapturedGraphs]:
    """``model``'s forward compiled with :class:`GraphCapture`, as a function of the forward's
    arguments, and its graphs, from a first call with ``args`` and ``kwargs`` (the compile)
    outside every dispatch mode. Raises what dynamo raises (a graph break under
    ``fullgraph``...)."""
    import torch._functorch.config as functorch_config

    capture = GraphCapture()
    compiled = torch.compile(fresh_call(), backend=capture, fullgraph=True, dynamic=False)

    def step(*args: Any, **kwargs: Any) -> Any:
        return compiled(model, args, kwargs)

    # The backward graph made now; no AOTAutograd cache, whose hit would skip the compilers.
    with suspended_modes(capture.graphs), \
            functorch_config.patch(force_non_lazy_backward_lowering=True,
                                   enable_autograd_cache=False):
        step(*args, **kwargs)
    return step, capture.graphs


def fresh_call(name: str = "memprop_compiled_step") -> Callable[..., Any]:
    """``call(model, args, kwargs)``, a function with a code object of its own, named ``name``.

    dynamo keeps its compiled code on the code object of the frame it compiles, and a lookup
    finds code that another ``torch.compile`` of the same forward made (the user's, with
    inductor; ``isolate_recompiles`` still falls back to those), whose guards pass for any
    module of the class. Compiled at a code object made for it, the forward is traced and
    partitioned again, through memprop's backend."""

    def call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return model(*args, **kwargs)

    code = call.__code__.replace(co_name=name)
    return types.FunctionType(code, call.__globals__, code.co_name)
