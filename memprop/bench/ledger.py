"""The ledger's cost: one ``memprop.profile`` call against one plain training step plus one
inference pass, with PyTorch's MemTracker measured beside it in the same run, and the cost of
the allocator's count alone (``memprop.devices.allocator``: the torch.profiler session that
``profile`` on real tensors runs around the same step and pass, so its time is inside
``memprop.profile``'s). The peaks: the ledger's and the allocator's, from one profile call."""

from __future__ import annotations

import functools
from typing import Any

import torch

import memprop
from memprop.bench.common import BenchReport, interleaved_medians
from memprop.devices.allocator import AllocatorMeter, step_state_tensors
from memprop.loop import training_step
from memprop.units import format_bytes
from memprop.workload import SeedConfig, Workload, seed_workload

__all__ = ["ledger_overhead"]

# The two shapes: many small ops (Python dispatch dominates) and few large ones.
CASES = {
    "dispatch-bound: 12 layers, width 64, batch 8":
        (SeedConfig(input_dim=64, hidden=64, classes=10, depth=12, batch=8), 3.0),
    "compute-bound: 4 layers, width 1024, batch 256":
        (SeedConfig(input_dim=1024, hidden=1024, classes=10, depth=4, batch=256), 1.2),
}


def _plain(workload: Workload) -> None:
    training_step(workload)
    with torch.inference_mode():
        workload.forward()


def _allocator(workload: Workload) -> None:
    """The plain step and pass, each under the allocator's meter (torch.profiler)."""
    with AllocatorMeter("cpu", step_state_tensors(workload)):
        training_step(workload)
    with AllocatorMeter("cpu", step_state_tensors(workload, training=False)), \
            torch.inference_mode():
        workload.forward()


def _memtracker(workload: Workload) -> None:
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    extra = [workload.targets] if workload.targets is not None else []
    owned = [workload.optimizer] if workload.optimizer is not None else []
    tracker.track_external(workload.model, *owned, *workload.inputs, *extra)
    with tracker:
        training_step(workload)
    tracker.reset_mod_stats()  # MemTracker refuses a second pass over the same modules without
    with tracker, torch.inference_mode():
        workload.forward()


def ledger_overhead(*, repeats: int = 21) -> BenchReport:
    rows: list[dict[str, Any]] = []
    summary = []
    for label, (config, goal) in CASES.items():
        workload = seed_workload(config)
        medians = interleaved_medians(
            {
                "plain": functools.partial(_plain, workload),
                "memprop": functools.partial(memprop.profile, workload),
                "memtracker": functools.partial(_memtracker, workload),
                "allocator": functools.partial(_allocator, workload),
            },
            repeats=repeats,
        )
        ours = medians["memprop"] / medians["plain"]
        theirs = medians["memtracker"] / medians["plain"]
        meter = medians["allocator"] / medians["plain"]
        profile = memprop.profile(workload)
        measured = profile.measured
        assert measured is not None  # real tensors: the allocator was read
        rows.append({
            "model": label,
            "plain step + inference (ms)": medians["plain"] * 1e3,
            "memprop.profile (ms)": medians["memprop"] * 1e3,
            "MemTracker (ms)": medians["memtracker"] * 1e3,
            "memprop / plain": ours,
            "MemTracker / plain": theirs,
            "allocator meter (ms)": medians["allocator"] * 1e3,
            "allocator / plain": meter,
            "goal": f"<= {goal}x",
            "met": "yes" if ours <= goal else "no",
            "ledger training peak": format_bytes(profile.training_peak_bytes),
            "allocator training peak": format_bytes(measured.training_peak_bytes),
            "ledger_training_peak_bytes": profile.training_peak_bytes,
            "allocator_training_peak_bytes": measured.training_peak_bytes,
            "ledger_inference_peak_bytes": profile.inference_peak_bytes,
            "allocator_inference_peak_bytes": measured.inference_peak_bytes,
        })
        training = _versus(profile.training_peak_bytes, measured.training_peak_bytes)
        inference = _versus(profile.inference_peak_bytes, measured.inference_peak_bytes)
        summary.append(
            f"- {label}: memprop.profile costs {ours:.2f}x a plain step plus an inference pass "
            f"(goal <= {goal}x: {'met' if ours <= goal else f'missed by {ours / goal:.2f}x'}); "
            f"MemTracker costs {theirs:.2f}x; the allocator's meter alone (a torch.profiler "
            f"session of memory events, inside memprop.profile's time) {meter:.2f}x. Peaks: the "
            f"ledger's training peak {training}, inference {inference}."
        )
    summary.append(
        f"- Medians of {repeats} interleaved repeats. memprop traces a training step and an "
        "inference pass, both under a Python dispatch mode; on the dispatch-bound model a mode "
        "that does nothing at all already costs about as much as the step itself, which sets "
        "the floor."
    )
    return BenchReport(
        name="ledger-overhead",
        title="The ledger's cost against a plain step",
        summary=summary,
        columns=[c for c in rows[0] if not c.endswith("_bytes")],
        rows=rows,
    )


def _versus(ledger: int, allocator: int) -> str:
    if ledger == allocator:
        return f"equals the allocator's to the byte ({format_bytes(allocator)})"
    return (f"{format_bytes(ledger)} against the allocator's {format_bytes(allocator)} "
            f"({(ledger - allocator) / allocator:+.3%})")
