"""``memprop.plan``: profile a workload, build its chain, solve for a budget."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memprop.blame import is_fake_tensor_limit
from memprop.calibration.rates import machine_rates, pointwise_seconds
from memprop.errors import ModelError, UsageError
from memprop.plan.chain import Chain
from memprop.plan.costs import DEFAULT_COST_MODEL, check_cost_model, mapped_seconds_per_byte
from memprop.plan.solvers import Plan, check_strategy, solve
from memprop.trace.caches import caching_configs, without_caches
from memprop.trace.compiled import COMPILED_NOTE, original
from memprop.trace.fake import device_of, exact_sizes_only, fake_mode_of, sized_at_worst
from memprop.trace.head import HeadRefusedError, chunk_counts, chunked_head, head_of
from memprop.trace.stages import SUFFIX, ChainCosts
from memprop.units import parse_size
from memprop.workload import Inputs, Workload, restore_state, save_state, to_workload

__all__ = ["chain_of", "check_strategy", "head_chunk_counts_of", "head_chunks_of", "plan",
           "priced"]


def plan(
    model: nn.Module | Workload,
    inputs: Inputs | None = None,
    budget: int | str | None = None,
    strategy: str = "optimal",
    cost_model: str = DEFAULT_COST_MODEL,
    *,
    loss_fn: Any = None,
    targets: torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    fake: bool = False,
    set_to_none: bool | None = None,
    blocks: str | None = None,
    chunk_head: bool | None = None,
) -> Plan:
    """The plan of ``strategy`` that keeps every training step of ``model(*inputs)`` under
    ``budget`` (bytes, or a size such as ``"2GiB"``) at the least extra compute.

    The steady-state step is traced to find the chain's costs (and the loop's first step, when
    its optimizer makes its state then: the plan covers both). ``cost_model`` prices
    recomputation (``memprop.plan.costs``): ``"roofline"`` (the default) by FLOPs and bytes
    moved at this machine's measured rates, the same plan on every run of a machine;
    ``"flops"`` by counted FLOPs alone, the same plan on every machine; ``"measured"`` by the
    stages' times on real steps, after which parameters, buffers, gradients and optimizer state
    are put back. With ``fake=True`` (or a model built in a fake-tensor mode) nothing is
    allocated; with ``fake=True``, the outputs of ops whose size depends on values
    (``nonzero``: a mixture of experts' routing) are taken at their worst case (NOTE [ Sizes
    that depend on values ] in ``memprop.trace.fake``). ``set_to_none`` says how the loop
    zeroes gradients (``zero_grad(set_to_none=...)``). The planner's stages are the model's blocks
    (NOTE [ What a run of blocks is ] in ``memprop.trace.blocks``), found in the traced step or
    named by ``blocks`` (the qualified name of an ``nn.Sequential`` or ``nn.ModuleList``); a
    block checkpointed alone may keep some of its op outputs (``memprop.plan.selective``).
    ``chunk_head=True`` lets the plan compute a Hugging Face causal LM's head and loss in chunks
    of tokens (NOTE [ The head option ] in ``memprop.plan.chain``): the model's output
    ``logits`` is then a zero view, so it is off unless asked (None: the Workload's own).
    Raises :class:`memprop.BudgetInfeasibleError` when nothing fits,
    :class:`memprop.errors.UsageError` for a model that is not a chain or a bad argument.
    """
    workload = to_workload(model, inputs, loss_fn=loss_fn, targets=targets, optimizer=optimizer,
                           set_to_none=set_to_none, blocks=blocks, chunk_head=chunk_head)
    budget_bytes = _budget(budget)
    check_strategy(strategy)
    asked_fake, fake = fake, fake or fake_mode_of(workload) is not None
    check_cost_model(cost_model, fake=fake)
    # Sizes that depend on values are taken at their worst case only when fake was asked for:
    # a caller that built a fake mirror of a real workload traces the real one instead.
    with contextlib.nullcontext() if asked_fake else exact_sizes_only():
        chain = chain_of(workload, cost_model=cost_model, fake=fake)
    return solve(chain, budget_bytes, strategy)


def chain_of(workload: Workload, *, cost_model: str, fake: bool = False) -> Chain:
    """The calibrated chain of the traced steady-state step of ``workload``.

    Only measured costs need a real step: otherwise a real workload is traced on a fake mirror
    (nothing allocated, the model untouched), unless fake tensors cannot trace it exactly (code
    that reads tensor values, or sizes that depend on them), in which case the real step is
    traced and the model put back after. A fake workload's data-dependent sizes are taken at
    their worst case (NOTE [ Sizes that depend on values ] in ``memprop.trace.fake``). The
    chain's ``cost_note`` says which. A Hugging Face model is traced with its key/value cache
    off, as its planned steps run (:func:`memprop.trace.caches.without_caches`)."""

    caching = bool(caching_configs(workload.model))
    with without_caches(workload.model):
        costs, traced_note = _trace_chain(workload, cost_model=cost_model, fake=fake)
    if caching:
        traced_note = "; ".join(n for n in (traced_note, CACHE_OFF_NOTE) if n)
    chain = priced(costs, cost_model=cost_model, device=str(device_of(workload)))
    heads = []
    names = [stage.name for stage in chain.stages]
    for chunks in head_chunk_counts_of(workload):
        chunked = _head_chain(workload, chunks, cost_model=cost_model, fake=fake)
        if (chunked is None or names[-1] != SUFFIX
                or [stage.name for stage in chunked.stages] != names):
            break
        # The blocks are the same in every step: priced once, so that the chains differ in
        # their suffix and loss alone (measured times would differ by noise).
        heads.append(dataclasses.replace(chunked, stages=(*chain.stages[:-1],
                                                          chunked.stages[-1])))
    chain = dataclasses.replace(chain, heads=tuple(heads))
    if original(workload.model) is not workload.model:
        traced_note = "; ".join(n for n in (traced_note, COMPILED_NOTE) if n)
    if traced_note:  # the head option's chains were traced as this one: the same notes
        heads = [dataclasses.replace(head, cost_note="; ".join(
            note for note in (head.cost_note, traced_note) if note)) for head in chain.heads]
        chain = dataclasses.replace(chain, heads=tuple(heads), cost_note="; ".join(
            note for note in (chain.cost_note, traced_note) if note))
    return chain


def head_chunk_counts_of(workload: Workload) -> tuple[int, ...]:
    """The chunk counts of the head option the planner prices for ``workload``
    (``memprop.trace.head.chunk_counts``), none where the option was not asked for
    (``Workload.chunk_head``) or does not apply: it applies to a causal LM whose loss is its
    own, computed from ``labels``."""
    if not workload.chunk_head:
        return ()
    head = head_of(original(workload.model))
    labels = workload.keywords.get("labels")
    if head is None or workload.loss_fn is not None or not isinstance(labels, torch.Tensor):
        return ()
    return chunk_counts(labels.numel())


def head_chunks_of(workload: Workload) -> int:
    """The most chunks of the head option the planner prices for ``workload``, 0 where the
    option does not apply (:func:`head_chunk_counts_of`)."""
    return max(head_chunk_counts_of(workload), default=0)


def _head_chain(workload: Workload, chunks: int, *, cost_model: str, fake: bool
                ) -> Chain | None:
    """The chain of the same step with the head and the loss in ``chunks`` chunks (NOTE [ The
    head option ] in ``memprop.plan.chain``); None when the model's forward does not compute
    its loss from its head's output (``HeadRefusedError``)."""
    model = original(workload.model)
    try:
        with without_caches(model), chunked_head(model, chunks):
            costs, _ = _trace_chain(workload, cost_model=cost_model, fake=fake)
    except HeadRefusedError:
        return None
    chunked = priced(costs, cost_model=cost_model, device=str(device_of(workload)))
    return dataclasses.replace(chunked, head_chunks=chunks)


def priced(costs: ChainCosts, *, cost_model: str, device: str) -> Chain:
    """The chain of a traced step (``trace_chain``), its costs priced by ``cost_model`` on
    ``device``: for the roofline, at this machine's rates and its pointwise calls' times
    (``memprop.plan.costs``), measured once and cached."""
    if cost_model != "roofline":
        return Chain.from_chain_costs(costs, cost_model=cost_model, device=device)
    rates = machine_rates(device)
    probes = {probe for stage in costs.stages
              for probe, _ in (*stage.forward_pointwise, *stage.backward_pointwise)}
    return Chain.from_chain_costs(costs, cost_model=cost_model, rates=rates,
                                  pointwise=pointwise_seconds(device, probes, rates),
                                  device=device,
                                  mapped_s_per_byte=mapped_seconds_per_byte(device))


CACHE_OFF_NOTE = ("traced with the key/value cache off, as plans run: the unplanned peak is the "
                  "step without it (the model's config has use_cache=True, which keeps every "
                  "layer's keys and values; memprop profile shows the step as configured)")
"""Why plan's unplanned peak differs from profile's for a Hugging Face model that keeps a
key/value cache in training: one figure per configuration, each named."""

READS_VALUES = ("traced on real tensors: the forward reads values, which fake tensors do not "
                "have")


def at_worst(ops: list[str]) -> str:
    """What the report says of a fake trace that sized ``ops`` at their worst case."""
    names = ", ".join(op.removeprefix("aten.").removesuffix(".default") for op in ops)
    return (f"traced on fake tensors with the outputs of {names} at their worst case (every "
            "element selected): the memory is an upper bound")


def _trace_chain(workload: Workload, *, cost_model: str, fake: bool) -> tuple[Any, str]:
    """The traced chain costs and what the report says of how they were traced ("" when on
    fake tensors exactly, or on the real step that ``measured`` asks for)."""
    from memprop.trace.profile import trace_chain

    if not fake and cost_model != "measured":
        try:
            with exact_sizes_only():
                return trace_chain(workload, fake=True), ""
        except ModelError as error:
            if not is_fake_tensor_limit(error):
                raise
        with _restored(workload):
            return trace_chain(workload, fake=False), READS_VALUES
    if not fake:
        with _restored(workload):
            return trace_chain(workload, fake=False), ""
    with sized_at_worst() as ops:
        costs = trace_chain(workload, fake=True)
    return costs, at_worst(ops) if ops else ""


def _budget(budget: int | str | None) -> int:
    if budget is None:
        raise UsageError("budget is missing: give a cap on the training peak, in bytes or as a "
                         "size such as '2GiB'")
    return parse_size(budget)


@contextlib.contextmanager
def _restored(workload: Workload) -> Iterator[None]:
    """Put parameters, buffers, gradients, the optimizer's state and the random generators back
    as they were after a real traced step: planning must not train the caller's model. (A copy
    of the model would not do: a loss function may hold the model itself, as the seed's weight
    decay does.)"""
    state = save_state(workload)
    try:
        yield
    finally:
        restore_state(workload, state)
