"""Measured peak against step time: ``optimal`` plans at many budgets, torch's own
``checkpoint_sequential`` at every segment count, no checkpointing, and ``torch.compile`` with
``activation_memory_budget``, for a deep MLP and a transformer stack, in one run.

Every contender's peak is measured in one step under the storage ledger, its FLOPs in another
under ``FlopCounterMode`` (recomputation included); its time is the median of untraced steps, all
contenders of a model interleaved, on one thread (the machine is shared, and two threads
contending with other processes give the noisiest medians). Plans are made on fake tensors with
recomputation priced in FLOPs, so they are the same on every machine.

Known limitations: the compiled contender's peak comes from the profiler's allocation events,
not the ledger (see ``memprop.bench._runtime_compile``); CPU timings of small steps carry a few
percent of noise even as interleaved medians.
"""

from __future__ import annotations

import contextlib
import io
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential
from torch.utils.flop_counter import FlopCounterMode

from memprop.bench._runtime_compile import compiled_points
from memprop.bench._runtime_workloads import CASES, QUICK_CASES, build
from memprop.bench.common import BenchReport, interleaved_medians
from memprop.blocks.install import installed
from memprop.loop import training_step, zero_gradients
from memprop.plan.api import chain_of
from memprop.plan.chain import Chain
from memprop.plan.schedule import Segment, flat, simulate
from memprop.plan.solvers import min_feasible_bytes, solve, uniform_tree
from memprop.report.output import write_output
from memprop.search import largest_true
from memprop.trace.ledger import StorageLedger
from memprop.trace.profile import profile
from memprop.trace.step import register_step_state
from memprop.units import format_bytes
from memprop.workload import Workload

__all__ = ["runtime_curves", "write_runtime_plot"]

GOAL_HALF_MEMORY_SLOWDOWN = 1.15
GOAL_VS_SEQUENTIAL = 0.9
GOAL_BATCH_FACTOR = 2.0
GOAL_BATCH_SLOWDOWN = 1.3
_FRACTIONS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15)
"""Budgets of the optimal curve: the unplanned peak less (1 - f) of the unplanned step's saved
activations, for each f; the least feasible peak is always added."""
COLUMNS = ["model", "contender", "setting", "batch", "budget_bytes", "predicted_peak_bytes",
           "peak_bytes", "step_s", "step_vs_unplanned", "flops", "flops_vs_unplanned"]


@dataclass(frozen=True, kw_only=True, slots=True)
class _Contender:
    contender: str
    setting: str
    budget_bytes: int | None
    predicted_peak_bytes: int | None
    tree: Segment | None
    """The plan's tree, run by memprop's executor; ``None`` with ``segments`` or neither."""
    segments: int | None
    """``torch.utils.checkpoint.checkpoint_sequential(segments=...)``, use_reentrant=False."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Point:
    peak_bytes: int
    flops: int


def runtime_curves(*, quick: bool = False) -> BenchReport:
    """Run the benchmark (about three minutes; seconds with ``quick``, which uses tiny models,
    one repeat and no torch.compile: it checks the machinery, not the goals)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows: list[dict[str, Any]] = []
        summary: list[str] = []
        for name, (_, batch, description) in (QUICK_CASES if quick else CASES).items():
            case_rows, case_summary = _case(name, batch, description, quick=quick)
            rows += case_rows
            summary += case_summary
        repeats = 1 if quick else _REPEATS
        summary.append(
            f"- Peaks: the storage ledger over one step (exact tensor bytes). Times: medians of "
            f"{repeats} interleaved steps per contender, one thread. FLOPs: FlopCounterMode "
            "over another step, recomputation included. Plans: `optimal`, made on fake "
            "tensors with costs in FLOPs, run by memprop's nested checkpoints; "
            "checkpoint_sequential is torch's own (use_reentrant=False)."
        )
        return BenchReport(name="runtime-curves",
                           title="Measured peak against step time, by strategy",
                           summary=summary, columns=COLUMNS, rows=rows)
    finally:
        torch.set_num_threads(threads)


_REPEATS = 9


def _case(name: str, batch: int, description: str, *, quick: bool
          ) -> tuple[list[dict[str, Any]], list[str]]:
    workload = build(name, batch, quick=quick)
    chain = chain_of(workload, cost_model="flops", fake=True)
    chain_module = _Target(workload.model, chain)
    n = len(chain)
    unplanned = _Contender(contender="none", setting="no checkpointing", budget_bytes=None,
                           predicted_peak_bytes=simulate(chain, flat(n)).peak_bytes, tree=None,
                           segments=None)
    sequential = [
        _Contender(contender="checkpoint_sequential", setting=f"segments={k}", budget_bytes=None,
                   predicted_peak_bytes=simulate(chain, uniform_tree(n, k)).peak_bytes,
                   tree=None, segments=k)
        for k in range(1, n + 1)
    ]
    points = {c: _measure(workload, chain_module, c) for c in [unplanned, *sequential]}
    base = points[unplanned]
    # The unplanned activation memory: what the unplanned forward saves for backward.
    activation_bytes = profile(workload, fake=True).saved_activations_bytes
    floor_bytes = min_feasible_bytes(chain)[0]
    half_bytes = base.peak_bytes - activation_bytes // 2
    budgets = {base.peak_bytes - int((1 - f) * activation_bytes) for f in _FRACTIONS}
    budgets |= {floor_bytes, half_bytes}
    budgets |= {points[c].peak_bytes for c in sequential}  # goal (b): equal measured peaks
    optimal = []
    for budget in sorted(b for b in budgets if b >= floor_bytes):
        plan = solve(chain, budget, "optimal")
        optimal.append(_Contender(contender="optimal", setting=f"budget {format_bytes(budget)}",
                                  budget_bytes=budget, predicted_peak_bytes=plan.peak_bytes,
                                  tree=plan.tree, segments=None))
    points |= {c: _measure(workload, chain_module, c) for c in optimal}
    contenders = [unplanned, *sequential, *optimal]
    times = interleaved_medians(
        {str(i): _stepper(workload, chain_module, c) for i, c in enumerate(contenders)},
        repeats=1 if quick else _REPEATS, warmup=1,
    )
    step_s = {c: times[str(i)] for i, c in enumerate(contenders)}
    rows = [_row(name, batch, c, points[c], step_s[c], base, step_s[unplanned])
            for c in contenders]

    summary = [f"**{name}** ({description}): unplanned peak {format_bytes(base.peak_bytes)}, "
               f"step {step_s[unplanned] * 1e3:.1f} ms, {base.flops / 1e9:.2f} GFLOP; "
               f"least feasible peak {format_bytes(floor_bytes)}."]
    half = next((c for c in optimal if c.budget_bytes == half_bytes), None)
    if half is None:
        summary.append(f"- (a) 50% of the unplanned activation memory, "
                       f"{format_bytes(half_bytes)}, is below the least feasible peak: missed.")
    else:
        summary.append(_goal_half(points[half], step_s[half] / step_s[unplanned], half_bytes,
                                  activation_bytes))
    summary.append(_goal_sequential(sequential, optimal, points, step_s, base.peak_bytes))
    batch_rows, batch_line = _goal_batch(name, batch, base.peak_bytes, quick=quick)
    rows += batch_rows
    summary.append(batch_line)
    if quick:
        summary.append("- torch.compile: did not run: quick mode skips it.")
    else:
        compile_rows, compile_line = _compiled(name, batch, base, step_s[unplanned])
        rows += compile_rows
        summary.append(compile_line)
    return rows, summary


def _row(name: str, batch: int, c: _Contender, point: _Point, step_s: float, base: _Point,
         base_step_s: float) -> dict[str, Any]:
    return {
        "model": name, "contender": c.contender, "setting": c.setting, "batch": batch,
        "budget_bytes": c.budget_bytes, "predicted_peak_bytes": c.predicted_peak_bytes,
        "peak_bytes": point.peak_bytes, "step_s": step_s,
        "step_vs_unplanned": step_s / base_step_s, "flops": point.flops,
        "flops_vs_unplanned": point.flops / base.flops if base.flops else None,
    }


def _goal_half(point: _Point, ratio: float, budget_bytes: int, activation_bytes: int) -> str:
    met = ratio <= GOAL_HALF_MEMORY_SLOWDOWN
    verdict = "met" if met else (
        f"missed by {ratio / GOAL_HALF_MEMORY_SLOWDOWN - 1:.0%}: the plan recomputes "
        "what it drops, and on the CPU a recomputed forward costs its full time")
    return (f"- (a) At 50% of the unplanned activation memory ({format_bytes(activation_bytes)} "
            f"saved for backward; budget the unplanned peak less half of it, "
            f"{format_bytes(budget_bytes)}, measured {format_bytes(point.peak_bytes)}), "
            f"optimal's step takes {ratio:.2f}x the unplanned step (goal <= "
            f"{GOAL_HALF_MEMORY_SLOWDOWN}x: {verdict}).")


def _goal_sequential(sequential: list[_Contender], optimal: list[_Contender],
                     points: dict[_Contender, _Point], step_s: dict[_Contender, float],
                     unplanned_bytes: int) -> str:
    ratios = []
    for c in sequential:
        budget = points[c].peak_bytes
        if budget >= unplanned_bytes:
            continue  # saves nothing: the goal is about budgets that need recomputation
        fits = [step_s[s] for s in sequential if points[s].peak_bytes <= budget]
        ours = next((o for o in optimal if o.budget_bytes == budget), None)
        if ours is not None and fits:
            ratios.append((step_s[ours] / min(fits), budget))
    if not ratios:
        return "- (b) No checkpoint_sequential segment count lowers the peak: nothing to compare."
    met = sum(r <= GOAL_VS_SEQUENTIAL for r, _ in ratios)
    median = statistics.median(r for r, _ in ratios)
    worst, at = max(ratios)
    verdict = "met" if median <= GOAL_VS_SEQUENTIAL else (
        f"missed by {median / GOAL_VS_SEQUENTIAL - 1:.0%} at the median: on a chain of equal "
        "stages the uniform split is already close to the best schedule for its peak, so "
        "optimal's edge is the memory a uniform split leaves unused, not a 10% saving")
    return (f"- (b) At each peak measured for checkpoint_sequential ({len(ratios)} budgets below "
            f"the unplanned peak), optimal's step against the fastest checkpoint_sequential "
            f"that fits: median {median:.2f}x, best {min(ratios)[0]:.2f}x, worst {worst:.2f}x "
            f"(at {format_bytes(at)}); <= {GOAL_VS_SEQUENTIAL}x at {met} of {len(ratios)} "
            f"(goal <= {GOAL_VS_SEQUENTIAL}x: {verdict}).")


def _goal_batch(name: str, batch: int, budget_bytes: int, *, quick: bool
                ) -> tuple[list[dict[str, Any]], str]:
    """The largest batch whose optimal plan fits ``budget_bytes`` (the unplanned peak at
    ``batch``) with at most 30% more FLOPs, found on fake tensors, then run for real."""
    def overhead(b: int) -> float | None:
        chain = chain_of(build(name, b, quick=quick), cost_model="flops", fake=True)
        plan = solve(chain, budget_bytes, "optimal", strict=False)
        return plan.compute_overhead if plan.feasible else None

    def fits(b: int) -> bool:
        extra = overhead(b)
        return extra is not None and extra <= GOAL_BATCH_SLOWDOWN - 1

    # A resolution of a sixteenth of the batch: enough for a 2x question.
    chosen = largest_true(fits, start=batch, limit=16 * batch, resolution=max(1, batch // 16))
    workload = build(name, chosen, quick=quick)
    chain = chain_of(workload, cost_model="flops", fake=True)
    chain_module = _Target(workload.model, chain)
    plan = solve(chain, budget_bytes, "optimal", strict=False)
    planned = _Contender(contender=f"optimal, batch {chosen}",
                         setting=f"budget {format_bytes(budget_bytes)}",
                         budget_bytes=budget_bytes, predicted_peak_bytes=plan.peak_bytes,
                         tree=plan.tree, segments=None)
    bare = _Contender(contender=f"none, batch {chosen}", setting="no checkpointing",
                      budget_bytes=None, predicted_peak_bytes=plan.baseline_peak_bytes,
                      tree=None, segments=None)
    points = {c: _measure(workload, chain_module, c) for c in (planned, bare)}
    times = interleaved_medians(
        {"planned": _stepper(workload, chain_module, planned),
         "bare": _stepper(workload, chain_module, bare)},
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
                   "bytes that no plan removes (parameters, each stage's own working memory, "
                   "the loss) leave too little room")
    else:
        verdict = (f"missed: the step takes {ratio / GOAL_BATCH_SLOWDOWN - 1:.0%} longer than "
                   "allowed, although the plan adds at most 30% FLOPs: recomputed ops cost "
                   "more time than their FLOPs say")
    line = (f"- (c) Budget = the unplanned peak at batch {batch}, {format_bytes(budget_bytes)}: "
            f"the largest batch whose optimal plan fits it with at most "
            f"{GOAL_BATCH_SLOWDOWN - 1:.0%} more FLOPs is {chosen} ({factor:.2f}x), measured "
            f"peak {format_bytes(points[planned].peak_bytes)}, step {ratio:.2f}x the unplanned "
            f"step at that batch, {plan.compute_overhead:+.0%} FLOPs predicted (goal >= "
            f"{GOAL_BATCH_FACTOR:g}x the batch at <= {GOAL_BATCH_SLOWDOWN}x the step: {verdict}).")
    return rows, line


def _compiled(name: str, batch: int, base: _Point, base_step_s: float
              ) -> tuple[list[dict[str, Any]], str]:
    found, reason = compiled_points(name, batch, repeats=_REPEATS, timeout_s=_COMPILE_CAP_S)
    rows = [{
        "model": name, "contender": "torch.compile",
        "setting": f"activation_memory_budget={p['activation_memory_budget']}", "batch": batch,
        "budget_bytes": None, "predicted_peak_bytes": None, "peak_bytes": p["peak_bytes"],
        "step_s": p["step_s"],
        # Against the eager step timed in the same child process: the two processes' times
        # are not interleaved, so a ratio across them would carry the machine's drift.
        "step_vs_unplanned": p["step_s"] / p["eager_step_s"], "flops": None,
        "flops_vs_unplanned": None,
    } for p in found]
    if not found:
        return rows, f"- torch.compile: did not run: {reason}."
    described = "; ".join(
        f"budget {p['activation_memory_budget']}: peak {format_bytes(p['peak_bytes'])}, "
        f"step {p['step_s'] / p['eager_step_s']:.2f}x eager (compiled in {p['compile_s']:.0f} s)"
        for p in found)
    eager = found[0]["eager_peak_bytes"]
    check = ("agrees with the ledger to the byte" if eager == base.peak_bytes
             else f"reads {format_bytes(eager)} against the ledger's "
                  f"{format_bytes(base.peak_bytes)}")
    tail = f" Stopped early: {reason}." if reason else ""
    return rows, (f"- torch.compile (inductor, C++ on the CPU) with activation_memory_budget: "
                  f"{described}. Peaks from the profiler's allocation events, which on the "
                  f"eager step {check}; times against the eager step in the same process "
                  f"(FLOPs not counted inside compiled code).{tail}")


_COMPILE_CAP_S = 45.0
"""Cap on the torch.compile child per model (cold compiles of these models take 10-30 s)."""


@dataclass(frozen=True, slots=True)
class _Target:
    """Where contenders are installed: the model and its chain's stage names."""

    model: nn.Module
    chain: Chain

    @property
    def sequential(self) -> nn.Sequential:
        """The nn.Sequential whose children are the blocks, for checkpoint_sequential."""
        names = [s.name for s in self.chain.stages]
        parent = names[0].rpartition(".")[0]
        found = dict(self.model.named_modules())[parent] if parent else self.model
        assert isinstance(found, nn.Sequential) and len(found) == len(names), names
        return found


def _measure(workload: Workload, chain: _Target, c: _Contender) -> _Point:
    zero_gradients(workload)
    ledger = StorageLedger()
    register_step_state(ledger, workload, training=True)
    with _installed(chain, c), ledger:
        training_step(workload)
    # A step of its own: FlopCounterMode's module tracker holds tensors of its own, which
    # raised a checkpointed transformer's measured peak by 11% when both ran in one step.
    zero_gradients(workload)
    counter = FlopCounterMode(display=False)
    with _installed(chain, c), counter:
        training_step(workload)
    return _Point(peak_bytes=ledger.peak()[0], flops=counter.get_total_flops())


def _stepper(workload: Workload, chain: _Target, c: _Contender) -> Callable[[], None]:
    def run() -> None:
        zero_gradients(workload)
        with _installed(chain, c):
            training_step(workload)
    return run


@contextlib.contextmanager
def _installed(target: _Target, c: _Contender) -> Iterator[None]:
    if c.tree is not None:
        with installed(target.model, [s.name for s in target.chain.stages], c.tree):
            yield
    elif c.segments is not None:
        sequential = target.sequential
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
              "none": ("*", "black"), "torch.compile": ("^", "tab:green")}
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
