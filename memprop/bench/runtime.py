"""Measured peak against step time on the models people train: memprop's ``optimal`` plans at
many budgets beside the recipes users reach for, in one run, for the seed MLP, a GPT-2-shaped
decoder and a ResNet-50-shaped network (``memprop.bench._runtime_workloads``).

The contenders:

- ``none``: no checkpointing.
- ``every block``: each block checkpointed (Hugging Face's ``gradient_checkpointing_enable()``,
  torchtitan's ``full``).
- ``every 2nd block``: the second, fourth... block checkpointed (torchtitan's selective
  layer checkpointing, frequency 2).
- ``op-level SAC``: every block checkpointed under torchtitan's op-level selective policy:
  the outputs of matrix products (every second one recomputed), attention and ``max`` are
  saved, the rest recomputed. torchtitan's models have no biases, so its list names
  ``aten.mm``; a linear layer with a bias runs ``aten.addmm``, counted here as a matrix
  product too, and the CPU's attention op is included.
- ``checkpoint_sequential``: torch's own, where the blocks are one ``nn.Sequential`` (the MLP).
- ``torch.compile`` with ``activation_memory_budget`` (inductor's partitioner decides what to
  recompute), in a child process (``memprop.bench._runtime_compile``).
- ``optimal``: memprop's plans, made on fake tensors, recomputation priced by the roofline
  (``memprop.plan.costs``), blocks that may keep some op outputs (``memprop.plan.selective``).

Every contender's peak is measured over a steady-state step (the optimizer's state made by a
step before) under the storage ledger and, in the same step, by the allocator's own count
(``memprop.devices.allocator``, which shares nothing with the ledger), its FLOPs in another
step under ``FlopCounterMode`` (recomputation included); its time is the median of untraced
steps, all contenders of a model interleaved, on one thread (the machine is shared, and two
threads contending with other processes give the noisiest medians).

Known limitations: the compiled contender's peak comes from the profiler's allocation events,
not the ledger (see ``memprop.bench._runtime_compile``); CPU timings of small steps carry a few
percent of noise even as interleaved medians.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential
from torch.utils.flop_counter import FlopCounterMode

from memprop.bench._runtime_compile import compiled_points
from memprop.bench._runtime_hf import hf_case
from memprop.bench._runtime_workloads import CASES, HF_GPT2, QUICK_CASES, build
from memprop.bench.common import BenchReport, interleaved_medians
from memprop.calibration.rates import machine_rates
from memprop.devices.allocator import AllocatorMeter, step_state_tensors
from memprop.loop import training_step, zero_gradients
from memprop.plan.api import priced
from memprop.plan.chain import Chain
from memprop.plan.schedule import Segment, flat, simulate
from memprop.plan.selective import Option, rerun_peak
from memprop.plan.solvers import min_feasible_bytes, solve
from memprop.report.output import write_output
from memprop.run.install import installed
from memprop.search import largest_true
from memprop.trace.ledger import StorageLedger
from memprop.trace.profile import profile, trace_chain
from memprop.trace.stages import ChainCosts
from memprop.trace.step import register_step_state
from memprop.units import format_bytes
from memprop.workload import Workload

__all__ = ["runtime_curves", "write_runtime_plot"]

GOAL_HALF_MEMORY_SLOWDOWN = 1.15
GOAL_VS_BASELINES = 0.9
GOAL_BATCH_FACTOR = 2.0
GOAL_BATCH_SLOWDOWN = 1.3
_FRACTIONS = (0.75, 0.5, 0.35, 0.25)
"""Budgets of the optimal curve: the unplanned peak less (1 - f) of the unplanned step's saved
activations, for each f; the least feasible peak and each baseline's measured peak are added."""
BASELINES = ("every block", "every 2nd block", "op-level SAC", "checkpoint_sequential")
COLUMNS = ["model", "contender", "setting", "batch", "budget_bytes", "predicted_peak_bytes",
           "peak_bytes", "allocator_peak_bytes", "step_s", "step_vs_unplanned", "flops",
           "flops_vs_unplanned"]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class _Contender:
    contender: str
    setting: str
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    tree: Segment | None = None
    """The plan's tree, run by memprop's executor on the model's blocks."""
    selective: dict[int, Option] = field(default_factory=dict)
    """Blocks checkpointed under a selective policy: the op outputs each keeps."""
    segments: int | None = None
    """``torch.utils.checkpoint.checkpoint_sequential(segments=...)``, use_reentrant=False."""
    predicted_overhead: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class _Point:
    peak_bytes: int
    """The ledger's."""
    flops: int
    allocator_peak_bytes: int | None = None
    """The allocator's, over the same step."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Model:
    """A workload and its chain, as the contenders see it (found once: the timed steps only
    install and run)."""

    workload: Workload
    costs: ChainCosts
    chain: Chain
    names: list[str]
    """The chain's stage names, where plans are installed."""
    blocks: list[int]
    """The stages a recipe may checkpoint: single-stage atoms that are not pinned, the chain's
    last stage apart (checkpointing it would re-run it at once)."""
    sequential: nn.Sequential | None
    """The nn.Sequential whose children are the blocks, where there is one."""

    @classmethod
    def of(cls, workload: Workload) -> _Model:
        costs = trace_chain(workload, fake=True)
        chain = priced(costs, cost_model="roofline", device="cpu")
        n = len(chain)
        blocks = [a for a, b in chain.atoms() if b == a + 1 and b < n
                  and chain.checkpointable(a, b)]
        return cls(workload=workload, costs=costs, chain=chain,
                   names=[s.name for s in chain.stages], blocks=blocks,
                   sequential=_sequential(workload.model, chain))


def _sequential(model: nn.Module, chain: Chain) -> nn.Sequential | None:
    names = [s.name for s in chain.stages if not s.pinned]
    parent = names[0].rpartition(".")[0] if names else ""
    found = dict(model.named_modules()).get(parent) if parent else None
    if isinstance(found, nn.Sequential) and [f"{parent}.{k}" for k, _ in
                                             found.named_children()] == names:
        return found
    return None


def runtime_curves(*, quick: bool = False) -> BenchReport:
    """Run the benchmark (a quarter of an hour; seconds with ``quick``, which uses tiny models,
    one repeat, and torch.compile only on the Hugging Face case, without code generation: it
    checks the machinery, not the goals)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows: list[dict[str, Any]] = []
        summary: list[str] = []
        cases = QUICK_CASES if quick else CASES
        for name, (_, batch, description) in cases.items():
            case_rows, case_summary = _case(name, batch, description, quick=quick)
            rows += case_rows
            summary += case_summary
        hf_rows, hf_summary = hf_case(quick=quick)
        rows += hf_rows
        summary += hf_summary
        repeats = 1 if quick else _REPEATS
        summary.append(_agreement(rows))
        summary.append(
            f"- Peaks: the storage ledger over a steady-state step (exact tensor bytes). Times: "
            f"medians of {repeats} interleaved steps per contender, one thread. FLOPs: "
            "FlopCounterMode over another step, recomputation included. Plans: `optimal`, made "
            "on fake tensors and priced by the roofline at this machine's rates "
            f"({machine_rates('cpu').describe()}), run by memprop's executor on the model's "
            "own blocks; checkpoint_sequential is torch's own (use_reentrant=False)."
        )
        return BenchReport(name="runtime-curves",
                           title="Measured peak against step time, by strategy",
                           summary=summary, columns=COLUMNS, rows=rows)
    finally:
        torch.set_num_threads(threads)


_REPEATS = 9


def _agreement(rows: list[dict[str, Any]]) -> str:
    """The ledger's peaks against the allocator's, measured in the same steps."""
    pairs = [(r["peak_bytes"], r["allocator_peak_bytes"]) for r in rows
             if r.get("allocator_peak_bytes") and r["contender"] != "torch.compile"
             and r["model"] != HF_GPT2]  # the HF case's peaks are the allocator's alone
    if not pairs:
        return "- The allocator's peaks were not read."
    same = sum(ledger == allocator for ledger, allocator in pairs)
    ledger, allocator = max(pairs, key=lambda p: abs(p[0] - p[1]) / p[1])
    return (f"- Every eager peak measured twice in one step: by the ledger and by the "
            f"allocator's own count (c10's CPU allocator through torch.profiler, plus the state "
            f"live before the step): equal to the byte in {same} of {len(pairs)} steps; the "
            f"largest difference {format_bytes(ledger - allocator)} "
            f"({(ledger - allocator) / allocator:+.3%} of the allocator's "
            f"{format_bytes(allocator)}).")


def _case(name: str, batch: int, description: str, *, quick: bool
          ) -> tuple[list[dict[str, Any]], list[str]]:
    model = _Model.of(build(name, batch, quick=quick))
    chain, workload = model.chain, model.workload
    n = len(chain)
    unplanned = _Contender(contender="none", setting="no checkpointing",
                           predicted_peak_bytes=simulate(chain, flat(n)).peak_bytes)
    baselines = _baselines(model)
    points = {c: _measure(model, c) for c in [unplanned, *baselines]}
    base = points[unplanned]
    # The unplanned activation memory: what the unplanned forward saves for backward.
    activation_bytes = profile(workload, fake=True).saved_activations_bytes
    floor_bytes = min_feasible_bytes(chain)[0]
    half_bytes = base.peak_bytes - activation_bytes // 2
    budgets = {base.peak_bytes - int((1 - f) * activation_bytes) for f in _FRACTIONS}
    budgets |= {floor_bytes, half_bytes}
    budgets |= {points[c].peak_bytes for c in baselines}  # goal (b): equal measured peaks
    optimal = []
    for budget in sorted(b for b in budgets if floor_bytes <= b < base.peak_bytes):
        plan = solve(chain, budget, "optimal")
        optimal.append(_Contender(contender="optimal", setting=f"budget {format_bytes(budget)}",
                                  budget_bytes=budget, predicted_peak_bytes=plan.peak_bytes,
                                  tree=plan.tree, selective=plan.selective,
                                  predicted_overhead=plan.compute_overhead))
    points |= {c: _measure(model, c) for c in optimal}
    contenders = [unplanned, *baselines, *optimal]
    times = interleaved_medians(
        {str(i): _stepper(model, c) for i, c in enumerate(contenders)},
        repeats=1 if quick else _REPEATS, warmup=1,
    )
    step_s = {c: times[str(i)] for i, c in enumerate(contenders)}
    rows = [_row(name, batch, c, points[c], step_s[c], base, step_s[unplanned])
            for c in contenders]

    summary = [f"**{name}** ({description}): unplanned peak {format_bytes(base.peak_bytes)}, "
               f"step {step_s[unplanned] * 1e3:.1f} ms, {base.flops / 1e9:.2f} GFLOP; "
               f"activations saved for backward {format_bytes(activation_bytes)}; least "
               f"feasible peak {format_bytes(floor_bytes)}."]
    half = next((c for c in optimal if c.budget_bytes == half_bytes), None)
    if half is None:
        summary.append(f"- (a) 50% of the unplanned activation memory, "
                       f"{format_bytes(half_bytes)}, is below the least feasible peak: missed.")
    else:
        summary.append(_goal_half(half, points[half], step_s[half] / step_s[unplanned],
                                  activation_bytes))
    summary += _goal_baselines(baselines, optimal, points, step_s, step_s[unplanned])
    batch_rows, batch_line = _goal_batch(name, batch, base.peak_bytes, quick=quick)
    rows += batch_rows
    summary.append(batch_line)
    if quick:
        summary.append("- torch.compile: did not run: quick mode skips it.")
    else:
        compile_rows, compile_line = _compiled(name, batch, base)
        rows += compile_rows
        summary.append(compile_line)
    return rows, summary


def _baselines(model: _Model) -> list[_Contender]:
    chain, blocks = model.chain, model.blocks
    n = len(chain)
    found = [
        _Contender(contender="every block", setting=f"{len(blocks)} checkpoints",
                   tree=_checkpointed(n, blocks)),
        _Contender(contender="every 2nd block", setting=f"{len(blocks[1::2])} checkpoints",
                   tree=_checkpointed(n, blocks[1::2])),
    ]
    titan = {i: _titan_option(model, i) for i in blocks}
    found.append(_Contender(contender="op-level SAC", setting="torchtitan's policy",
                            tree=_checkpointed(n, blocks, selective=True), selective=titan))
    if model.sequential is not None:
        found += [_Contender(contender="checkpoint_sequential", setting=f"segments={k}",
                             segments=k)
                  for k in (2, 4, 8, 16) if k <= len(blocks) + 1]
    predicted = []
    base = simulate(chain, flat(n)).compute
    for c in found:
        if c.tree is None:
            predicted.append(c)
            continue
        options = {i: (o,) for i, o in c.selective.items()}
        with_options = dataclasses.replace(chain, stages=tuple(
            dataclasses.replace(s, options=options.get(i, ())) for i, s in enumerate(chain.stages)))
        sim = simulate(with_options, c.tree)
        predicted.append(dataclasses.replace(c, predicted_peak_bytes=sim.peak_bytes,
                                             predicted_overhead=sim.compute / base - 1))
    return predicted


def _checkpointed(n: int, stages: list[int], *, selective: bool = False) -> Segment:
    """Stages ``stages`` checkpointed one by one (under their first selective option with
    ``selective``), the rest kept."""
    chosen = set(stages)
    return Segment(start=0, stop=n, children=tuple(
        Segment(start=i, stop=i + 1, children=(i,), option=int(selective)) if i in chosen else i
        for i in range(n)))


_TITAN_SAVED = frozenset({
    "aten.mm.default", "aten.addmm.default", "aten.max.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_cudnn_attention.default",
})
_MATMULS = frozenset({"aten.mm.default", "aten.addmm.default"})


def _titan_option(model: _Model, index: int) -> Option:
    """Torchtitan's op-level policy on block ``index``, as a selective option (what it keeps,
    and the re-run's transient, for the prediction; its saving is not priced)."""
    stats = model.costs.stages[index]
    keep, matmuls = set(), 0
    for op in stats.ops:
        if op.op in _MATMULS:
            matmuls += 1
            if matmuls % 2 == 0:
                continue  # torchtitan recomputes every second matrix product
        if op.op in _TITAN_SAVED and op.allocates:
            keep.add((op.op, op.occurrence))
    kept = frozenset(keep)
    return Option(cache_bytes=sum(o.cache_bytes for o in stats.ops
                                  if (o.op, o.occurrence) in kept),
                  saved_cost=0.0, rerun_peak_bytes=rerun_peak(stats.ops, kept,
                                                               stats.forward_peak_bytes),
                  keep=tuple(sorted(kept)))


def _row(name: str, batch: int, c: _Contender, point: _Point, step_s: float, base: _Point,
         base_step_s: float) -> dict[str, Any]:
    return {
        "model": name, "contender": c.contender, "setting": c.setting, "batch": batch,
        "budget_bytes": c.budget_bytes, "predicted_peak_bytes": c.predicted_peak_bytes,
        "peak_bytes": point.peak_bytes, "allocator_peak_bytes": point.allocator_peak_bytes,
        "step_s": step_s,
        "step_vs_unplanned": step_s / base_step_s, "flops": point.flops,
        "flops_vs_unplanned": point.flops / base.flops if base.flops else None,
    }


def _goal_half(c: _Contender, point: _Point, ratio: float, activation_bytes: int) -> str:
    met = ratio <= GOAL_HALF_MEMORY_SLOWDOWN
    predicted = c.predicted_overhead or 0.0
    if met:
        verdict = "met"
    elif 1 + predicted > GOAL_HALF_MEMORY_SLOWDOWN:
        verdict = (f"missed by {ratio / GOAL_HALF_MEMORY_SLOWDOWN - 1:.0%}: the cheapest plan "
                   f"at this budget is priced at {1 + predicted:.2f}x already: what it must "
                   f"recompute to keep half of the activations costs {predicted:.0%} of the "
                   "step on this machine (selective options included), and the measured step "
                   "adds the checkpoints' own bookkeeping")
    else:
        verdict = (f"missed by {ratio / GOAL_HALF_MEMORY_SLOWDOWN - 1:.0%}: the plan was "
                   f"priced at {1 + predicted:.2f}x; the rest is what the cost model does not "
                   "price (the checkpoints' own bookkeeping, the machine's noise)")
    return (f"- (a) At 50% of the unplanned activation memory ({format_bytes(activation_bytes)} "
            f"saved for backward; budget the unplanned peak less half of it, "
            f"{format_bytes(c.budget_bytes or 0)}, measured {format_bytes(point.peak_bytes)}), "
            f"optimal's step takes {ratio:.2f}x the unplanned step, predicted "
            f"{1 + predicted:.2f}x (goal <= {GOAL_HALF_MEMORY_SLOWDOWN}x: {verdict}).")


def _goal_baselines(baselines: list[_Contender], optimal: list[_Contender],
                    points: dict[_Contender, _Point], step_s: dict[_Contender, float],
                    unplanned_s: float) -> list[str]:
    """Goal (b): at each baseline's measured peak, optimal against the fastest baseline that
    fits there."""
    lines = []
    for c in baselines:
        budget = points[c].peak_bytes
        fits = [b for b in baselines if points[b].peak_bytes <= budget]
        fastest = min(fits, key=lambda b: step_s[b])
        ours = next((o for o in optimal if o.budget_bytes == budget), None)
        label = f"{c.contender} ({c.setting})"
        if ours is None:
            lines.append(f"- (b) {label}: measured peak {format_bytes(budget)} is not below "
                         "the unplanned one or below the least feasible: nothing to compare.")
            continue
        ratio = step_s[ours] / step_s[fastest]
        floor = unplanned_s / step_s[fastest]
        if ratio <= GOAL_VS_BASELINES:
            verdict = "met"
        elif floor > GOAL_VS_BASELINES:
            verdict = (f"missed, and out of reach: even the unplanned step takes {floor:.2f}x "
                       f"the fastest baseline here, so no plan can reach "
                       f"{GOAL_VS_BASELINES}x")
        else:
            verdict = f"missed by {ratio / GOAL_VS_BASELINES - 1:.0%}"
        lines.append(
            f"- (b) At the measured peak of {label}, {format_bytes(budget)}: optimal "
            f"measured {format_bytes(points[ours].peak_bytes)}, step "
            f"{step_s[ours] / unplanned_s:.2f}x the unplanned step against "
            f"{step_s[fastest] / unplanned_s:.2f}x for the fastest baseline that fits "
            f"({fastest.contender}, {fastest.setting}): {ratio:.2f}x (goal <= "
            f"{GOAL_VS_BASELINES}x: {verdict}).")
    return lines


def _goal_batch(name: str, batch: int, budget_bytes: int, *, quick: bool
                ) -> tuple[list[dict[str, Any]], str]:
    """The largest batch whose optimal plan fits ``budget_bytes`` (the unplanned peak at
    ``batch``) at a predicted step of at most 1.3x, found on fake tensors, then run for real."""
    def fits(b: int) -> bool:
        chain = _Model.of(build(name, b, quick=quick)).chain
        plan = solve(chain, budget_bytes, "optimal", strict=False)
        return plan.feasible and plan.compute_overhead <= GOAL_BATCH_SLOWDOWN - 1

    # A resolution of a sixteenth of the batch: enough for a 2x question.
    chosen = largest_true(fits, start=batch, limit=16 * batch, resolution=max(1, batch // 16))
    model = _Model.of(build(name, chosen, quick=quick))
    plan = solve(model.chain, budget_bytes, "optimal", strict=False)
    planned = _Contender(contender=f"optimal, batch {chosen}",
                         setting=f"budget {format_bytes(budget_bytes)}",
                         budget_bytes=budget_bytes, predicted_peak_bytes=plan.peak_bytes,
                         tree=plan.tree, selective=plan.selective)
    bare = _Contender(contender=f"none, batch {chosen}", setting="no checkpointing",
                      predicted_peak_bytes=plan.baseline_peak_bytes)
    points = {c: _measure(model, c) for c in (planned, bare)}
    times = interleaved_medians(
        {"planned": _stepper(model, planned), "bare": _stepper(model, bare)},
        repeats=1 if quick else _REPEATS, warmup=1)
    rows = [_row(name, chosen, c, points[c], times[key], points[bare], times["bare"])
            for c, key in ((planned, "planned"), (bare, "bare"))]
    ratio = times["planned"] / times["bare"]
    factor = chosen / batch
    within = points[planned].peak_bytes <= budget_bytes
    met = factor >= GOAL_BATCH_FACTOR and ratio <= GOAL_BATCH_SLOWDOWN and within
    if met:
        verdict = "met"
    elif not within:
        verdict = "missed: the measured peak exceeds the budget"
    elif factor < GOAL_BATCH_FACTOR:
        verdict = (f"missed: {factor:.2f}x is {1 - factor / GOAL_BATCH_FACTOR:.0%} short; the "
                   "bytes that no plan removes (parameters, AdamW's state, each block's own "
                   "working memory, the loss) leave too little room")
    else:
        verdict = (f"missed: the step takes {ratio / GOAL_BATCH_SLOWDOWN - 1:.1%} longer than "
                   f"allowed; the batch was chosen by the plan's price, "
                   f"{1 + plan.compute_overhead:.2f}x, and the cost model's error on this "
                   "machine is a few percent")
    line = (f"- (c) Budget = the unplanned peak at batch {batch}, {format_bytes(budget_bytes)}: "
            f"the largest batch whose optimal plan fits it at a predicted step of at most "
            f"{GOAL_BATCH_SLOWDOWN}x is {chosen} ({factor:.2f}x), measured peak "
            f"{format_bytes(points[planned].peak_bytes)}, step {ratio:.2f}x the unplanned "
            f"step at that batch, predicted {1 + plan.compute_overhead:.2f}x (goal >= "
            f"{GOAL_BATCH_FACTOR:g}x the batch at <= {GOAL_BATCH_SLOWDOWN}x the step: {verdict}).")
    return rows, line


def _compiled(name: str, batch: int, base: _Point) -> tuple[list[dict[str, Any]], str]:
    found, reason = compiled_points(name, batch, repeats=_REPEATS, timeout_s=_COMPILE_CAP_S)
    timed = [p for p in found if "step_s" in p]
    rows = [{
        "model": name, "contender": "torch.compile",
        "setting": f"activation_memory_budget={p['activation_memory_budget']}", "batch": batch,
        "budget_bytes": None, "predicted_peak_bytes": None, "peak_bytes": p["peak_bytes"],
        "allocator_peak_bytes": p["peak_bytes"], "step_s": p["step_s"],
        # Against the eager step interleaved with it in the child process: a ratio across
        # the two processes would carry the machine's drift.
        "step_vs_unplanned": p["step_s"] / p["eager_step_s"], "flops": None,
        "flops_vs_unplanned": None,
    } for p in timed]
    if not timed:
        return rows, f"- torch.compile: did not run: {reason}."
    described = "; ".join(
        f"budget {p['activation_memory_budget']}: peak {format_bytes(p['peak_bytes'])}, "
        f"step {p['step_s'] / p['eager_step_s']:.2f}x eager (compiled in {p['compile_s']:.0f} s)"
        for p in timed)
    eager = timed[0]["eager_peak_bytes"]
    check = ("agrees with the ledger to the byte" if eager == base.peak_bytes
             else f"reads {format_bytes(eager)} against the ledger's "
                  f"{format_bytes(base.peak_bytes)}")
    tail = f" Stopped early: {reason}." if reason else ""
    return rows, (f"- torch.compile (inductor, C++ on the CPU) with activation_memory_budget: "
                  f"{described}. Peaks by the allocator's count (the profiler's allocation "
                  f"events), which on the eager step {check}; times against the eager step, "
                  f"interleaved with it in one child process (FLOPs not counted inside "
                  f"compiled code).{tail}")


_COMPILE_CAP_S = 600.0
"""Cap on the torch.compile child per model (cold compiles of these models take a minute or
two on this kind of machine; resnet50's ran past 240 s on a shared one)."""


def _measure(model: _Model, c: _Contender) -> _Point:
    workload = model.workload
    _stepper(model, c)()  # the optimizer's state exists from here on: the steady state
    zero_gradients(workload)
    ledger = StorageLedger()
    register_step_state(ledger, workload, training=True)
    meter = AllocatorMeter("cpu", step_state_tensors(workload))
    with _installed(model, c), meter, ledger:
        training_step(workload)
    assert meter.result is not None
    # A step of its own: FlopCounterMode's module tracker holds tensors of its own, which
    # raised a checkpointed transformer's measured peak by 11% when both ran in one step.
    zero_gradients(workload)
    counter = FlopCounterMode(display=False)
    with _installed(model, c), counter:
        training_step(workload)
    return _Point(peak_bytes=ledger.peak()[0], flops=counter.get_total_flops(),
                  allocator_peak_bytes=meter.result.peak_bytes)


def _stepper(model: _Model, c: _Contender) -> Callable[[], None]:
    def run() -> None:
        zero_gradients(model.workload)
        with _installed(model, c):
            training_step(model.workload)
    return run


@contextlib.contextmanager
def _installed(model: _Model, c: _Contender) -> Iterator[None]:
    if c.tree is not None:
        with installed(model.workload.model, model.names, c.tree, c.selective,
                       [s.draws_random for s in model.chain.stages]):
            yield
    elif c.segments is not None:
        sequential = model.sequential
        assert sequential is not None
        stages = list(sequential)
        segments = c.segments

        def forward(x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = checkpoint_sequential(stages, segments, x, use_reentrant=False)
            return out

        sequential.forward = forward  # type: ignore[method-assign]
        try:
            yield
        finally:
            del sequential.forward
    else:
        yield


def write_runtime_plot(report: BenchReport, path: Path) -> Path:
    """The curves of ``report`` as a PNG: one panel per model, step time across, peak up."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("the runtime plot needs matplotlib: pip install matplotlib") from error
    models = list(dict.fromkeys(r["model"] for r in report.rows))
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    styles = {"optimal": ("o", "tab:blue"), "checkpoint_sequential": ("s", "tab:orange"),
              "every block": ("D", "tab:red"), "every 2nd block": ("d", "tab:purple"),
              "op-level SAC": ("P", "tab:brown"), "none": ("*", "black"),
              "torch.compile": ("^", "tab:green"), "HF checkpointing": ("X", "tab:olive"),
              "memprop": ("o", "tab:cyan"), "memprop, head option": ("h", "tab:blue"),
              "memprop compiled": ("v", "tab:pink")}
    for axis, model in zip(axes[0], models, strict=True):
        rows = [r for r in report.rows if r["model"] == model]
        for contender, (marker, color) in styles.items():
            chosen = sorted((r for r in rows if r["contender"] == contender),
                            key=lambda r: r["peak_bytes"])
            if not chosen:
                continue
            axis.plot([r["step_s"] * 1e3 for r in chosen],
                      [r["peak_bytes"] / 2**20 for r in chosen], marker, color=color,
                      label=contender, markersize=12 if contender == "none" else 6)
            if contender == "checkpoint_sequential":
                for r in chosen:
                    axis.annotate(r["setting"].removeprefix("segments="),
                                  (r["step_s"] * 1e3, r["peak_bytes"] / 2**20), fontsize=7,
                                  textcoords="offset points", xytext=(4, 2), color=color)
        axis.set_title(model)
        axis.set_xlabel("median step time (ms)")
        axis.set_ylabel("measured peak (MiB)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Measured peak against step time (checkpoint_sequential labelled by "
                    "segment count)", fontsize=10)
    figure.tight_layout()
    # Rendered in memory, then written by write_output's rules (whole or not at all); the
    # suffix still picks the format, as savefig(path) did (png when there is none).
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix[1:].lower() or None, dpi=120)
    plt.close(figure)
    write_output(path, buffer.getvalue())
    return path
