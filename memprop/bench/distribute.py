"""The seed's last exercise, answered with ``memprop.distribute``: split the step across
devices, or train with smaller minibatches on one (and where does recomputation win)?

Two parts, one report:

- **The answer across depth, width and batch** (predicted, fake tensors, any size): the seed MLP
  with AdamW on a device of ``BUDGET`` with ``DEVICES`` of them available; for each
  configuration, the best candidate of each family (one device as it is, recomputation,
  microbatches, DDP, FSDP2, a pipeline) and the one chosen: the fastest predicted step that fits.
  Per-rank memory curves against the batch are plotted for one depth and width.
- **The choice checked by brute force** (measured, small sizes, gloo on this machine, no more
  ranks than cores): every candidate run and every rank counted by the allocator (the figure
  that shares nothing with the ledger that predicts) and by the ledger; the prediction's error
  per rank, each candidate's predicted step against its measured one (the goal: within 25%),
  and whether the chosen candidate is within 10% of the fastest *measured* one among those
  whose measured peaks fit. FSDP2's candidates are also estimated by torch's
  ``FSDPMemTracker`` (fake process group, fake tensors), beside memprop's prediction and the
  measurement.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memprop.bench.common import BenchReport
from memprop.distribute import Candidate, Distribution, distribute
from memprop.report.output import write_output
from memprop.units import format_bytes
from memprop.workload import SeedConfig, Workload, seed_workload

__all__ = ["SeedFactory", "family", "split_or_accumulate", "write_distribute_plot"]

BUDGET = 2**30
"""Per-device memory of the exercise: 1 GiB (a small device; the shapes scale with it)."""
DEVICES = 2
WIDTHS = (1024, 4096)
DEPTHS = (4, 6, 12)
BATCHES = (256, 16384)
CURVE_DEPTH, CURVE_WIDTH = 8, 2048
CURVE_BATCHES = (256, 1024, 4096, 16384, 65536)
FAMILIES = ("one device", "recompute", "microbatches", "DDP", "FSDP2", "pipeline")
COLUMNS = ["part", "depth", "width", "batch", "family", "candidate", "fits", "peak_bytes",
           "predicted_step_s", "chosen", "measured_peak_bytes", "allocator_peak_bytes",
           "measured_step_s", "step_ratio", "step_goal", "fsdp_mem_tracker_bytes"]
STEP_GOAL = 0.25
"""The predicted step within this much of the measured one."""
CHOICE_GOAL = 0.10
"""The chosen candidate's measured step within this much of the fastest measured."""


@dataclass(frozen=True, slots=True)
class SeedFactory:
    """A picklable ``factory(batch_size)`` of the seed MLP (the ranks each build their own)."""

    config: SeedConfig

    def __call__(self, batch_size: int) -> Workload:
        return seed_workload(dataclasses.replace(self.config, batch=batch_size))


def family(candidate: Candidate) -> str:
    """The exercise's answer a candidate stands for (its strategy's word for it)."""
    from memprop.distribute.strategies import strategy_of

    return strategy_of(candidate).family(candidate)


def _seed(depth: int, width: int) -> SeedFactory:
    return SeedFactory(SeedConfig(depth=depth, hidden=width, optimizer="adamw"))


def _best_per_family(result: Distribution, *, least_memory: bool = False
                     ) -> Iterator[tuple[str, Candidate, bool]]:
    """Each family's best candidate (fitting and fastest, else the least peak; or the least
    peak), and whether it is the chosen one."""
    chosen = result.candidates[result.chosen]
    for name in FAMILIES:
        members = [c for c in result.candidates if family(c) == name]
        if members:
            best = min(members, key=lambda c: (c.peak_bytes,) if least_memory else (
                not c.fits, c.predicted_step_s if c.fits else c.peak_bytes))
            yield name, best, best is chosen


def _predict(depth: int, width: int, batch: int) -> Distribution | int:
    """The distribution, or the least per-rank budget when nothing fits."""
    from memprop.errors import BudgetInfeasibleError

    try:
        return distribute(_seed(depth, width), batch_size=batch, devices=DEVICES,
                          budget=BUDGET, microbatches=(1, 2, 4, 8))
    except BudgetInfeasibleError as error:
        return error.min_feasible_bytes


SPLITS = ("DDP", "FSDP2", "pipeline")
ONE_DEVICE = ("one device", "recompute", "microbatches")


def _state_bytes(factory: SeedFactory) -> int:
    """Parameters, gradients and AdamW's two moments: what a device holds whatever the batch,
    unless the state is split."""
    from memprop.trace.fake import new_fake_mode

    with new_fake_mode():
        model = factory(1).model
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


def _answer_rows() -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Per shape: each family's best, the fastest step that fits (the choice) and the least
    device time (step x devices) that fits; then what the shapes say, counted."""
    rows, lines = [], []
    tally: dict[str, list[str]] = {"split only": [], "one device cheapest": [],
                                   "split cheapest": [], "microbatches": [], "recompute": [],
                                   "nothing": []}
    for width in WIDTHS:
        for depth in DEPTHS:
            for batch in BATCHES:
                factory = _seed(depth, width)
                shape = f"depth {depth}, width {width}, batch {batch}"
                state = (f"{format_bytes(_state_bytes(factory))} of parameters, gradients and "
                         "AdamW state")
                result = _predict(depth, width, batch)
                if isinstance(result, int):
                    lines.append(f"{shape} ({state}): nothing fits (each rank needs "
                                 f"{format_bytes(result)} at least)")
                    tally["nothing"].append(shape)
                    rows.append({"part": "answer", "depth": depth, "width": width,
                                 "batch": batch, "family": "(none fits)",
                                 "peak_bytes": result})
                    continue
                for name, best, is_chosen in _best_per_family(result):
                    rows.append(_row("answer", depth, width, batch, name, best, is_chosen))
                fitting = [c for c in result.candidates if c.fits]
                cheapest = min(fitting, key=lambda c: c.predicted_step_s * c.devices)
                chosen = result.candidates[result.chosen]
                lines.append(f"{shape} ({state}): fastest {family(chosen)} "
                             f"({chosen.describe()}); least device time {family(cheapest)} "
                             f"({cheapest.describe()})")
                families = {family(c) for c in fitting}
                if not families & set(ONE_DEVICE):
                    tally["split only"].append(shape)
                elif family(cheapest) in ONE_DEVICE:
                    tally["one device cheapest"].append(shape)
                    if family(cheapest) in ("microbatches", "recompute"):
                        tally[family(cheapest)].append(shape)
                else:
                    tally["split cheapest"].append(shape)
    return rows, lines, _in_short(tally, len(WIDTHS) * len(DEPTHS) * len(BATCHES))


def _in_short(tally: dict[str, list[str]], shapes: int) -> list[str]:
    """The exercise's answer, counted from the shapes (not written in advance)."""
    def listed(key: str) -> str:
        return f"{len(tally[key])} of {shapes}" + (f" ({'; '.join(tally[key])})"
                                                    if tally[key] else "")

    return [
        f"- Splitting is the only way in {listed('split only')}: the state a device holds "
        "whatever the batch does not fit beside the activations; FSDP2 or a pipeline divides "
        "it.",
        f"- Where one device can take the step (as it is, in microbatches or recomputing), it "
        f"takes the least device time in {listed('one device cheapest')}; splitting buys wall "
        f"time, at the cost of communication (cheaper in device time in "
        f"{listed('split cheapest')}).",
        f"- On one device over the budget, microbatches win in {listed('microbatches')}, "
        f"recomputation in {listed('recompute')}: the MLP's activations shrink with the "
        "microbatch, and a microbatch costs only its re-read weights and launches.",
        f"- Nothing fits in {listed('nothing')}.",
    ]


def _curve_rows() -> list[dict[str, Any]]:
    """Each family's least per-rank peak against the batch (no budget); recomputation's is
    the least budget one device meets, recomputing all it can."""
    rows = []
    for batch in CURVE_BATCHES:
        result = distribute(_seed(CURVE_DEPTH, CURVE_WIDTH), batch_size=batch,
                            devices=DEVICES, microbatches=(1, 2, 4, 8))
        for name, best, _ in _best_per_family(result, least_memory=True):
            rows.append(_row("curve", CURVE_DEPTH, CURVE_WIDTH, batch, name, best, False))
        alone = next(c for c in result.candidates
                     if c.strategy == "accumulate" and c.microbatches == 1)
        rows.append({**_row("curve", CURVE_DEPTH, CURVE_WIDTH, batch, "recompute", alone,
                            False), "peak_bytes": alone.least_budget_bytes})
    return rows


def _row(part: str, depth: int, width: int, batch: int, name: str, candidate: Candidate,
         chosen: bool) -> dict[str, Any]:
    measured = [r.measured_peak_bytes for r in candidate.ranks
                if r.measured_peak_bytes is not None]
    counted = [r.allocator_peak_bytes for r in candidate.ranks
               if r.allocator_peak_bytes is not None]
    return {"part": part, "depth": depth, "width": width, "batch": batch, "family": name,
            "candidate": candidate.describe(), "fits": candidate.fits,
            "peak_bytes": candidate.peak_bytes,
            "predicted_step_s": round(candidate.predicted_step_s, 6), "chosen": chosen,
            "measured_peak_bytes": max(measured) if measured else None,
            "allocator_peak_bytes": max(counted) if counted else None,
            "measured_step_s": candidate.measured_step_s,
            "step_ratio": None if not candidate.measured_step_s else round(
                candidate.predicted_step_s / candidate.measured_step_s, 3),
            "step_goal": None,
            "rank_errors": [None if r.independent_peak_bytes is None
                            else r.independent_peak_bytes - r.predicted_peak_bytes
                            for r in candidate.ranks]}


def _brute_force(quick: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Every candidate of small cases run and measured; each predicted step against its
    measured one; the chosen against the fastest measured that fits."""
    from memprop.distribute.launch import available_cores

    ranks = max(2, min(4, available_cores()))  # no more ranks than cores: times comparable
    cases = [(4, 256, 256)] if quick else [(4, 256, 256), (8, 512, 512), (6, 1024, 256)]
    rows, lines = [], []
    for depth, width, batch in cases:
        factory = _seed(depth, width)
        unplanned = distribute(factory, batch_size=batch, devices=1, microbatches=(1,),
                               calibrate=False)
        budget = int(0.7 * unplanned.candidates[0].peak_bytes)
        load = os.getloadavg()[0]
        before = CpuClock.now()
        result = distribute(factory, batch_size=batch, devices=ranks, budget=budget,
                            microbatches=(1, 2, 4), run=True)
        other = other_cores(before, CpuClock.now())
        load = max(load, os.getloadavg()[0])
        trackers = _fsdp_mem_tracker(factory, result)
        lines += _case_lines(depth, width, batch, ranks, budget, result)
        lines[-1] += (f" The machine's load average while it ran: {load:.1f} on "
                      f"{available_cores()} cores; other work than this benchmark's took "
                      f"{other:.2f} of them on average.")
        for index, candidate in enumerate(result.candidates):
            row = _row("measured", depth, width, batch, family(candidate), candidate,
                       index == result.chosen)
            row["devices"] = ranks
            row["budget_bytes"] = budget
            row["fsdp_mem_tracker_bytes"] = trackers.get(index)
            if candidate.measured_step_s:
                met, why = step_verdict(candidate.predicted_step_s, candidate.measured_step_s,
                                        candidate.devices, family(candidate), other,
                                        available_cores())
                row["step_goal"] = "met" if met else "missed"
                lines.append(f"    - {candidate.describe()}: predicted "
                             f"{candidate.predicted_step_s * 1e3:.2f} ms, measured "
                             f"{candidate.measured_step_s * 1e3:.2f} ms, ratio "
                             f"{row['step_ratio']:.2f}: {why}")
            rows.append(row)
    return rows, lines


OTHER_WORK_CORES = 0.25
"""Other work taking this much of the cores, on average while a case runs, is named as the
reason for a step that missed its goal (the ranks then shared cores with it)."""
MODEL_PARTS = {
    "pipeline": "the schedule's runtime beyond its timed per-action cost and the stages' "
                "calibrated compute",
    "FSDP2": "FSDP2's all-gathers, reduce-scatters and copies on gloo beyond their timed "
             "prices",
    "DDP": "DDP's all-reduce and bucket copies on gloo beyond their timed prices",
}
"""What the model prices beyond the calibrated compute, by family: where a miss with no
other work to blame lies."""


def step_verdict(predicted_s: float, measured_s: float, devices: int, name: str,
                 other: float, cores: int) -> tuple[bool, str]:
    """Whether a candidate's predicted step is within ``STEP_GOAL`` of its measured one, and
    why not: its ranks sharing cores, other work on the machine (``other`` cores of it on
    average), or the part of the model its family adds to the calibrated compute."""
    ratio = predicted_s / measured_s
    if abs(ratio - 1) <= STEP_GOAL:
        return True, f"within {STEP_GOAL:.0%}, goal met"
    way = "slower" if ratio < 1 else "faster"
    if devices > cores:
        why = f"its {devices} ranks shared {cores} cores"
    elif other >= OTHER_WORK_CORES:
        why = (f"other work took {other:.2f} of the {cores} cores while the case ran, "
               "and the ranks shared them")
    else:
        why = "the model's error: " + MODEL_PARTS.get(
            name, "the calibration's fit of the microbatch's compute and the optimizer's step")
    return False, f"goal missed, it ran {way} than predicted ({why})"


@dataclass(frozen=True, slots=True)
class CpuClock:
    """The machine's busy CPU seconds (every process, and what the hypervisor gave other
    guests) and this process's with its finished children's (the ranks it launched)."""

    wall_s: float
    busy_s: float
    ours_s: float

    @classmethod
    def now(cls) -> CpuClock:
        import time

        import psutil

        machine = psutil.cpu_times()
        busy = sum(getattr(machine, name, 0.0) for name in (
            "user", "nice", "system", "irq", "softirq", "steal"))
        mine = psutil.Process().cpu_times()
        return cls(wall_s=time.monotonic(), busy_s=busy,
                   ours_s=mine.user + mine.system + mine.children_user + mine.children_system)


def other_cores(before: CpuClock, after: CpuClock) -> float:
    """The cores other work took on average between two readings: the machine's busy time
    less this benchmark's, over the wall time."""
    wall = after.wall_s - before.wall_s
    if wall <= 0:
        return 0.0
    return max(0.0, (after.busy_s - before.busy_s) - (after.ours_s - before.ours_s)) / wall


def _case_lines(depth: int, width: int, batch: int, ranks: int, budget: int,
                result: Distribution) -> list[str]:
    """What one brute-force case shows: memory, step times, the choice."""
    ran = [c for c in result.candidates if c.measured_step_s]
    fitting = [c for c in ran if max(r.independent_peak_bytes or 0 for r in c.ranks) <= budget]
    fastest = min(fitting or ran, key=lambda c: c.measured_step_s or float("inf"))
    chosen = result.candidates[result.chosen]
    ratio = (chosen.measured_step_s or 0) / (fastest.measured_step_s or 1)
    errors = [abs(r.independent_peak_bytes - r.predicted_peak_bytes) / r.independent_peak_bytes
              for c in ran for r in c.ranks if r.independent_peak_bytes]
    off = [c for c in ran if abs(c.predicted_step_s / (c.measured_step_s or 1) - 1) > STEP_GOAL]
    ratios = [c.predicted_step_s / (c.measured_step_s or 1) for c in ran]
    within = len(ran) - len(off)
    by_family: dict[str, list[float]] = {}
    for c in ran:
        by_family.setdefault(family(c), []).append(c.predicted_step_s / (c.measured_step_s or 1))
    families = "; ".join(f"{name} {min(r):.2f}-{max(r):.2f}" for name, r in by_family.items())
    margin = fastest.predicted_step_s / chosen.predicted_step_s - 1
    if fastest is chosen:
        verdict = "the choice is the fastest measured: goal met."
    elif ratio <= 1 + CHOICE_GOAL:
        verdict = (f"the choice is {ratio:.2f}x the fastest measured: within "
                   f"{CHOICE_GOAL:.0%}, goal met.")
    else:
        said = any("step-time model's error" in n for n in result.notes)
        verdict = (f"the choice is {ratio:.2f}x the fastest measured: goal missed; the "
                   f"fastest was predicted {margin:+.0%} slower than the choice, against the "
                   f"model's measured error of {result.step_error:.0%} on this workload"
                   + (" (within it, as the report said)." if said else "."))
    return [
        f"- Depth {depth}, width {width}, batch {batch}, {ranks} ranks, budget "
        f"{format_bytes(budget)} (70% of one device's step): {len(result.candidates)} "
        f"candidates, every rank measured; the largest prediction error against the "
        f"allocator's count on any rank is {max(errors, default=0):.3%}.",
        f"  - Step times: {within} of {len(ran)} candidates predicted within {STEP_GOAL:.0%} of "
        f"the measured step (predicted/measured {min(ratios, default=0):.2f}-"
        f"{max(ratios, default=0):.2f}; by family: {families}). Model: {result.step_time}.",
        f"  - Chosen: {chosen.describe()} ({chosen.predicted_step_s * 1e3:.1f} ms predicted, "
        f"{(chosen.measured_step_s or 0) * 1e3:.1f} ms measured); fastest measured that fits: "
        f"{fastest.describe()} ({fastest.predicted_step_s * 1e3:.1f} ms predicted, "
        f"{(fastest.measured_step_s or 0) * 1e3:.1f} ms measured): {verdict}",
    ]


def _fsdp_mem_tracker(factory: SeedFactory, result: Distribution) -> dict[int, int]:
    """torch's FSDPMemTracker peak (the highest rank's) for each FSDP2 candidate, run as its
    documentation shows: a fake process group, fake tensors, a step, reset, a step."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from memprop.distribute.fsdp import fake_rank

    found = {}
    for index, candidate in enumerate(result.candidates):
        if candidate.strategy != "fsdp":
            continue
        peaks = []
        for rank in range(candidate.devices):
            with fake_rank(factory, candidate.microbatch_size, candidate.microbatches,
                           candidate.devices, rank, candidate.sharded) as (workload, step):
                tracker = FSDPMemTracker(workload.model, workload.optimizer)
                tracker.track_inputs(workload.inputs)
                with tracker:
                    step()
                    tracker.reset_mod_stats()
                    step()
                snapshot = tracker.get_tracker_snapshot("peak")
                peaks.append(max(int(v["Total"]) for v in snapshot.values()))
        found[index] = max(peaks)
    return found


def split_or_accumulate(*, quick: bool = False) -> BenchReport:
    """The report: the answer across shapes, the curves, the brute-force check."""
    answer, wins, short = ([], [], []) if quick else _answer_rows()
    curves = [] if quick else _curve_rows()
    measured, checks = _brute_force(quick)
    summary = [
        "Split the step across devices, or train with smaller minibatches on one? The seed MLP "
        f"with AdamW, {DEVICES} devices of {format_bytes(BUDGET)} each; every candidate "
        "predicted per rank by memprop.distribute (fake tensors), the fastest predicted step "
        "that fits chosen. Step times are the roofline's on this CPU, calibrated by real steps "
        "of each workload timed here, and communication priced by each collective's "
        "algorithm over links timed on gloo: the memory figures transfer to other machines, "
        "the times only as ratios.",
        "",
        "In short:",
        *short,
        "",
        "Per shape, the fastest step that fits (memprop's choice) and the one that takes the "
        "least device time (step x devices: what the step costs):",
        *[f"- {w}" for w in wins],
        "",
        "The choice checked by brute force (every candidate run on gloo, no more ranks than "
        "cores, every rank counted by the allocator and by the ledger; a step's time is the "
        "fastest of its timed steps, as the model's calibration takes it, the machine shared "
        "with other work):",
        *checks,
        "",
        _together_sentence(measured),
        "",
        _fsdp_sentence(measured),
    ]
    return BenchReport(name="split-or-accumulate",
                       title="Split across devices, or accumulate microbatches?",
                       summary=summary, columns=COLUMNS, rows=answer + curves + measured)


def _together_sentence(rows: list[dict[str, Any]]) -> str:
    """Predicted against measured steps, for candidates on one rank and on several."""
    def span(ratios: list[float]) -> str:
        return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "none"

    ran = [r for r in rows if r.get("step_ratio")]
    alone = [r["step_ratio"] for r in ran if r["family"] in ONE_DEVICE]
    together = [r["step_ratio"] for r in ran if r["family"] not in ONE_DEVICE]
    met = sum(r.get("step_goal") == "met" for r in ran)
    return (f"Predicted over measured step: {span(alone)} for the candidates on one rank (run "
            f"while the other ranks wait), {span(together)} for those whose ranks run at once "
            f"(DDP, FSDP2, pipelines); {met} of {len(ran)} within {STEP_GOAL:.0%}. With --run "
            "the model prices the ranks as they step at once on this machine (their "
            "contention with each other and with other work, measured in one launch just "
            "before the candidates'); other work that changes while the candidates run is "
            "not in it, and each miss above says whether there was any.")


def _fsdp_sentence(rows: list[dict[str, Any]]) -> str:
    """FSDP2's per-rank figures: memprop's prediction and FSDPMemTracker's, each against the
    allocator's count of the real rank."""
    fsdp = [r for r in rows if r.get("fsdp_mem_tracker_bytes") and r.get("allocator_peak_bytes")]
    if not fsdp:
        return "No FSDP2 candidate ran (or none was counted by the allocator)."
    errors = [e / r["allocator_peak_bytes"] for r in fsdp for e in r["rank_errors"]
              if e is not None]
    ours = [r["peak_bytes"] / r["allocator_peak_bytes"] for r in fsdp]
    theirs = [r["fsdp_mem_tracker_bytes"] / r["allocator_peak_bytes"] for r in fsdp]
    return (f"FSDP2 ({len(fsdp)} candidates, {len(errors)} ranks), against the allocator's "
            f"count of each real rank: memprop's prediction is {min(ours):.2f}x-"
            f"{max(ours):.2f}x the highest rank's (per rank, the allocator above the prediction "
            f"by {min(errors):+.2%} to {max(errors):+.2%}); FSDPMemTracker's peak, on the same "
            f"fake group, is {min(theirs):.2f}x-{max(theirs):.2f}x.")


def write_distribute_plot(report: BenchReport, path: Path) -> Path:
    """Per-rank peak against batch, one line per family, the budget drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r["part"] == "curve"]
    figure, axis = plt.subplots(figsize=(7.5, 5))
    for name in FAMILIES:
        points = sorted((r["batch"], r["peak_bytes"]) for r in rows if r["family"] == name)
        if points:
            axis.plot([b for b, _ in points], [p / 2**20 for _, p in points], "o-", label=name)
    axis.axhline(BUDGET / 2**20, color="grey", linestyle="--", label="budget per device")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log", base=2)
    axis.set_xlabel("global batch")
    axis.set_ylabel("predicted peak per rank (MiB)")
    axis.set_title(f"Seed MLP, depth {CURVE_DEPTH}, width {CURVE_WIDTH}, AdamW, "
                   f"{DEVICES} devices: each family's least-memory candidate", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_output(path, buffer.getvalue())
    return path
