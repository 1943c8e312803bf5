"""A ``torch.compile``'d training step planned to a peak budget, in bytes.

A compiled step is not memprop's chain of blocks: inductor runs AOTAutograd's partitioned
graphs, and what they keep for backward is the min-cut partitioner's choice. The knobs that a
compiled step honours are the plan:

- ``torch._functorch.config.activation_memory_budget`` (AMB): the share of the activations'
  bytes the partitioner may keep; below 1 it recomputes the cheapest of the rest in backward;
- the head option (``memprop.trace.head``): a Hugging Face causal LM's head and loss in chunks
  of tokens, when the workload allows it (``chunk_head``).

Each candidate is checked by tracing its compiled step on fake tensors (``memprop.trace.aot``:
inductor's own partitioner, the graphs run op by op under the ledger; nothing is allocated) and
priced by its graphs (:func:`graph_cost`). The plan is the candidate of least predicted compute
whose held peak is within the budget.

NOTE [ The figure a compiled plan holds to the budget ]
A compiled step's trace gives two figures. ``predicted_peak_bytes`` models inductor's fusion
(NOTE [ What inductor fuses ] in ``memprop.trace.aot``): exact at AMB 1.0 on the tests' models,
but below the allocator where the partitioner recomputes: the residual MLP of the tests read
6.9% low at AMB 0.3, 2.7% at 0.1, 4.0% at 0.0 (2.1% high at 0.5), since inductor stores the
backward's recomputed forward ops otherwise than the model assumes: its output code (2-block
MLP of the tests, AMB 0.1, 3.7% low) fuses each recomputed LayerNorm into the kernel of its
block's backward, runs kernels out of the graph's order and hands a dead buffer to a new value
("reuse"), so one or two activation-sized buffers (16 KiB each there) live across kernels that
the graph's order frees them before. Modelling inductor's scheduler is not attempted.
``bound_peak_bytes`` is the
same trace with every fused-away pointwise result stored until its last reader (the op-by-op
step, no fusion): the fused trace's peak plus the most bytes of fused-away results live at once
in either graph (``fused_away_bytes``). Fusion only removes storages from the op-by-op step, so
that figure is above the fused step whatever inductor fuses; on the same MLP the allocator read
14-31% below it at every AMB from 0 to 1. **The bound is the figure held to the budget**:
a plan never exceeds its budget by the allocator's count, at the price of leaving that gap
unused. Exact in both: parameters, gradients, optimizer state, inputs and the saved activations
(the partitioner's, read off its graphs). The first step (the optimizer makes its state) and
the steady one are both traced, and the higher held.

NOTE [ How the activation memory budget is searched ]
The reference candidate is AMB 1.0 without the head option (nothing recomputed): when it fits,
it is the plan. Otherwise AMB is bisected over [0, 1] (``BISECTIONS`` halvings), going up where a
probe fits and down where it does not, for the model's own head and for the head option's most
chunks; every other chunk count is probed at AMB 1.0 (fewer chunks hold more logits but pass
over the head's weight fewer times). Every probe is kept, and the plan is the probe of least
compute among those within the budget. The peak is not monotone in AMB
(at 0 the backward recomputes all, and its temporaries can peak above AMB 1.0's), so the
bisection finds the largest fitting AMB only where it is; a budget no probe meets is refused
with the least held peak found. Probes are memoised by (AMB, chunks) in :class:`CompiledProbes`,
so that several budgets of one workload share them.

Known limitations: the step must compile as one graph (``fullgraph``) with static shapes on
inductor; per-block selective checkpoint policies are not among the candidates; the extra
compute is priced, not timed (the bench measures it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry

from memprop.errors import BudgetInfeasibleError, UsageError
from memprop.plan.solvers import cli_size, least_budget_words
from memprop.trace.aot import CapturedGraphs, fused_away
from memprop.trace.caches import without_caches
from memprop.trace.compiled import compiled_step, original
from memprop.trace.fake import device_of, fake_mode_of, new_fake_mode, to_fake_workload
from memprop.trace.head import chunked_head
from memprop.units import format_bytes
from memprop.workload import Workload

__all__ = ["BISECTIONS", "COMPILED_COST_MODELS", "CompiledCandidate", "CompiledPlan",
           "CompiledProbes", "graph_cost", "plan_compiled", "probe"]

BISECTIONS = 4
"""Halvings of [0, 1] after AMB 1.0: the AMB found is within 1/16 of the largest that fits."""
COMPILED_COST_MODELS = ("roofline", "flops")
"""How a compiled candidate's graphs are priced: FLOPs and bytes moved at this machine's rates,
or FLOPs alone (the same on every machine)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CompiledCandidate:
    """One setting of the compiled step's knobs, traced on fake tensors and priced."""

    activation_memory_budget: float
    head_chunks: int
    """The head option's chunks (0: the model's own head)."""
    predicted_peak_bytes: int
    """The training peak with inductor's fusion modelled (NOTE [ The figure a compiled plan
    holds to the budget ])."""
    bound_peak_bytes: int
    """The op-by-op peak, above the compiled step's: the figure held to the budget."""
    saved_activations_bytes: int
    """What the partitioner keeps for backward (exact)."""
    cost: float
    """The forward and backward graphs' price (seconds by the roofline, or FLOPs)."""

    def to_dict(self) -> dict[str, Any]:
        return {"activation_memory_budget": self.activation_memory_budget,
                "head_chunks": self.head_chunks,
                "predicted_peak_bytes": self.predicted_peak_bytes,
                "bound_peak_bytes": self.bound_peak_bytes,
                "saved_activations_bytes": self.saved_activations_bytes, "cost": self.cost}


@dataclass(frozen=True, kw_only=True, slots=True)
class CompiledPlan:
    """The knobs of a compiled step chosen for a budget, with what they are predicted to do."""

    budget_bytes: int
    activation_memory_budget: float
    """``torch._functorch.config.activation_memory_budget`` while the step compiles."""
    head_chunks: int
    """The head option's chunks (0: none)."""
    predicted_peak_bytes: int
    """The training peak, inductor's fusion modelled (the best estimate)."""
    bound_peak_bytes: int
    """The op-by-op peak, held to the budget (NOTE [ The figure a compiled plan holds to the
    budget ])."""
    compute_overhead: float
    """Predicted extra compute over the unplanned compiled step (AMB 1.0, no head option), as
    a fraction of its graphs' price; negative where the plan computes less."""
    baseline_peak_bytes: int
    """The unplanned compiled step's predicted peak (AMB 1.0, no head option)."""
    baseline_bound_peak_bytes: int
    cost_model: str
    candidates: tuple[CompiledCandidate, ...]
    """Every candidate traced, in the order probed."""
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The plan document's keys (DESIGN's plan JSON: no stages, no schedule) plus the
        compiled step's own under ``compiled``."""
        return {
            "budget_bytes": self.budget_bytes,
            "strategy": "compiled",
            "cost_model": self.cost_model,
            "feasible": True,
            "min_feasible_bytes": min(c.bound_peak_bytes for c in self.candidates),
            "stages": [],
            "schedule": [],
            "head_chunks": self.head_chunks,
            "predicted": {"peak_bytes": self.bound_peak_bytes,
                          "compute_overhead": self.compute_overhead},
            "baseline": {"peak_bytes": self.baseline_bound_peak_bytes},
            "compiled": {
                "activation_memory_budget": self.activation_memory_budget,
                "head_chunks": self.head_chunks,
                "predicted_peak_bytes": self.predicted_peak_bytes,
                "bound_peak_bytes": self.bound_peak_bytes,
                "compute_overhead": self.compute_overhead,
                "baseline_peak_bytes": self.baseline_peak_bytes,
                "baseline_bound_peak_bytes": self.baseline_bound_peak_bytes,
                "candidates": [c.to_dict() for c in self.candidates],
                "notes": list(self.notes),
            },
        }


@dataclass(slots=True)
class CompiledProbes:
    """The candidates of one workload traced so far, by (AMB, chunks): plans of several budgets
    share them (each probe compiles the step once)."""

    cost_model: str = "roofline"
    found: dict[tuple[float, int], CompiledCandidate] = field(default_factory=dict)

    def get(self, workload: Workload, amb: float, chunks: int) -> CompiledCandidate:
        key = (float(amb), int(chunks))
        if key not in self.found:
            self.found[key] = probe(workload, amb, chunks, cost_model=self.cost_model)
        return self.found[key]


def plan_compiled(workload: Workload, budget_bytes: int, *, chunk_head: bool = False,
                  cost_model: str = "roofline", probes: CompiledProbes | None = None
                  ) -> CompiledPlan:
    """The compiled step's knobs of least predicted compute whose op-by-op peak is within
    ``budget_bytes`` (NOTE [ How the activation memory budget is searched ]). ``workload``
    is real or fake, its model compiled or not (its original module is compiled again;
    nothing is allocated). Raises :class:`memprop.errors.BudgetInfeasibleError` when no
    candidate fits."""
    if cost_model not in COMPILED_COST_MODELS:
        raise UsageError(f"cost model {cost_model!r} cannot price a compiled step: use one of "
                         f"{', '.join(COMPILED_COST_MODELS)}")
    probes = probes if probes is not None else CompiledProbes(cost_model=cost_model)
    reference = probes.get(workload, 1.0, 0)
    if budget_bytes < _floor_bytes(workload):  # no knob goes below it: no search
        raise _infeasible(workload, budget_bytes, [reference])
    counts = _head_chunk_counts(workload) if chunk_head else ()
    tried: list[CompiledCandidate] = [reference]
    # Every chunk count at AMB 1.0 (fewer chunks may cost less); AMB is bisected for the model's
    # own head and for the most chunks only, the least memory each can reach without the other.
    tried += [probes.get(workload, 1.0, head) for head in counts]
    for head in (0, *counts[-1:]):
        found = probes.get(workload, 1.0, head)
        if found.bound_peak_bytes <= budget_bytes:
            continue
        low, high = 0.0, 1.0
        for _ in range(BISECTIONS + 1):
            middle = (low + high) / 2
            found = probes.get(workload, middle, head)
            tried.append(found)
            if found.bound_peak_bytes <= budget_bytes:
                low = middle
            else:
                high = middle
        if low == 0.0:  # nothing fitted down to 1/32: recomputing all is the last resort
            tried.append(probes.get(workload, 0.0, head))
    tried = list(dict.fromkeys(tried))
    fitting = [c for c in tried if c.bound_peak_bytes <= budget_bytes]
    if not fitting:
        raise _infeasible(workload, budget_bytes, tried)
    chosen = min(fitting, key=lambda c: (c.cost, -c.activation_memory_budget, c.head_chunks))
    return CompiledPlan(
        budget_bytes=budget_bytes,
        activation_memory_budget=chosen.activation_memory_budget,
        head_chunks=chosen.head_chunks,
        predicted_peak_bytes=chosen.predicted_peak_bytes,
        bound_peak_bytes=chosen.bound_peak_bytes,
        compute_overhead=chosen.cost / reference.cost - 1 if reference.cost else 0.0,
        baseline_peak_bytes=reference.predicted_peak_bytes,
        baseline_bound_peak_bytes=reference.bound_peak_bytes,
        cost_model=probes.cost_model,
        candidates=tuple(tried),
        notes=(HELD_NOTE,),
    )


def _infeasible(workload: Workload, budget_bytes: int, tried: list[CompiledCandidate]
                ) -> BudgetInfeasibleError:
    least = min(tried, key=lambda c: c.bound_peak_bytes)
    head = f"in {least.head_chunks} chunks" if least.head_chunks else "as it is"
    return BudgetInfeasibleError(
        f"budget {format_bytes(budget_bytes)} is below every compiled step memprop tried for "
        f"{workload.name}: the least peak held was {least_budget_words(least.bound_peak_bytes)} "
        f"(op by op, activation_memory_budget {least.activation_memory_budget:g}, the head "
        f"{head}): raise "
        f"--budget to at least {cli_size(least.bound_peak_bytes)} or lower --batch",
        budget_bytes=budget_bytes, min_feasible_bytes=least.bound_peak_bytes)


def _floor_bytes(workload: Workload) -> int:
    """Bytes every compiled step holds at once whatever its knobs: the parameters, their
    gradients (all live when backward ends) and the inputs, each storage once."""
    model = original(workload.model)
    storages: dict[Any, int] = {}
    for tensor in (*model.parameters(), *workload.input_tensors):
        storages[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(storages.values()) + gradients


HELD_NOTE = ("the peak held to the budget is the compiled step's op by op (every fused-away "
             "result stored until its last reader), above what inductor's fused step "
             "allocates; the predicted peak models the fusion, and can read a few percent low "
             "where the partitioner recomputes")


def _head_chunk_counts(workload: Workload) -> tuple[int, ...]:
    from memprop.plan.api import head_chunk_counts_of  # the planner's rule of when it applies

    was = workload.chunk_head
    workload.chunk_head = True
    try:
        return head_chunk_counts_of(workload)
    finally:
        workload.chunk_head = was


def probe(workload: Workload, amb: float, chunks: int, *, cost_model: str = "roofline"
          ) -> CompiledCandidate:
    """One candidate: ``workload``'s step compiled under ``activation_memory_budget=amb`` (the
    head in ``chunks`` chunks), traced on fake tensors (first and steady step) and priced."""
    from memprop.trace.step import trace_training

    fake = _fake_copy(workload)
    mode = fake_mode_of(fake)
    assert mode is not None
    plain = fake.model
    compiled: Any = torch.compile(plain, dynamic=False)  # an OptimizedModule, typed loosely
    fake.model = compiled
    notes: list[str] = []
    with mode, _compiling_under(amb), without_caches(plain), chunked_head(plain, chunks), \
            compiled_step(fake, notes) as graphs:
        if graphs is None:
            raise UsageError(
                f"memprop cannot plan {workload.name}'s compiled step: "
                f"{'; '.join(notes) or 'its graphs were not captured'}. A compiled plan needs "
                "a step that compiles as one graph with static shapes: plan the eager model "
                "instead (without --compile)")
        graphs.fused = False  # the first step and the steady one, op by op: the bound
        bound = trace_training(fake)
        graphs.fused = True  # the steady step again (the state is made), fusion modelled
        steady = trace_training(fake)
    assert graphs.forward is not None and graphs.backward is not None
    return CompiledCandidate(
        activation_memory_budget=float(amb), head_chunks=chunks,
        predicted_peak_bytes=steady.steady.ledger.peak()[0],
        bound_peak_bytes=max(bound.steady.ledger.peak()[0], bound.first_step_peak_bytes or 0),
        saved_activations_bytes=graphs.saved_bytes,
        cost=_graphs_cost(graphs, cost_model, str(device_of(fake))))


def _fake_copy(workload: Workload) -> Workload:
    """A fake mirror of ``workload`` with its original (uncompiled) module, fresh: each probe
    traces the loop's first step and its steady one from the same start."""
    plain = original(workload.model)
    mode = fake_mode_of(workload) or new_fake_mode()
    compiled, workload.model = workload.model, plain
    try:
        return to_fake_workload(workload, mode)
    finally:
        workload.model = compiled


@contextlib.contextmanager
def _compiling_under(amb: float) -> Iterator[None]:
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=float(amb)):
        yield


def _graphs_cost(graphs: CapturedGraphs, cost_model: str, device: str) -> float:
    assert graphs.forward is not None and graphs.backward is not None
    flops, moved = (a + b for a, b in zip(graph_cost(graphs.forward),
                                           graph_cost(graphs.backward), strict=True))
    if cost_model == "flops":
        return float(flops)
    from memprop.calibration.rates import machine_rates

    rates = machine_rates(device)
    return flops / rates.flops_per_s + moved / rates.bytes_per_s


def graph_cost(graph: torch.fx.GraphModule) -> tuple[int, int]:
    """(FLOPs, bytes moved) of one aten graph as inductor runs it: each op's FLOPs by
    ``torch.utils.flop_counter``'s formulas, and the bytes of what it stores and of the stored
    buffers it reads, fused-away pointwise results and views left out (they live in
    registers). Recomputation in backward shows as more ops in the backward graph."""
    away = fused_away(graph)
    flops = moved = 0
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        formula = flop_registry.get(getattr(node.target, "overloadpacket", None))
        if formula is not None:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs),
                                                 lambda n: n.meta.get("val"))
            with contextlib.suppress(Exception):  # a formula that cannot take the values: 0
                flops += int(formula(*args, **kwargs, out_val=node.meta.get("val")))
        if node in away:
            continue
        moved += _value_bytes(node) + sum(_value_bytes(n) for n in node.all_input_nodes
                                          if n not in away)
    return flops, moved


def _value_bytes(node: torch.fx.Node) -> int:
    value = node.meta.get("val")
    values = value if isinstance(value, (tuple, list)) else (value,)
    return sum(int(v.numel()) * v.element_size() for v in values
               if isinstance(v, torch.Tensor) and not _is_view(node))


def _is_view(node: torch.fx.Node) -> bool:
    return bool(getattr(node.target, "is_view", False))
