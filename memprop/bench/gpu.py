"""The GPU part of ``memprop bench``: the ledger against the allocator, the layers above it, and
a planned run against an unplanned one, on seed MLPs of growing batch.

Each case is warmed up by one plain training step first, so that cuBLAS has allocated its
workspaces (one per thread: the forward runs on the caller's, the backward on autograd's) before
anything is measured. Without a CUDA device ``gpu_report`` returns None.
"""

from __future__ import annotations

import re
from typing import Any

import torch

import memprop
from memprop.bench.common import BenchReport
from memprop.devices import gpu_layers
from memprop.devices.cuda import CudaDevice, allocated_bytes
from memprop.errors import BudgetInfeasibleError
from memprop.loop import compute_loss
from memprop.plan.api import plan as make_plan
from memprop.run.measure import run_plan
from memprop.trace.ledger import CUDA_BLOCK_BYTES
from memprop.units import format_bytes
from memprop.workload import SeedConfig, Workload, seed_workload

__all__ = ["gpu_report", "outside_bytes", "report_name", "warm_up"]

LEDGER_GOAL = 0.02
"""The ledger's training peak is within 2% of ``torch.cuda.max_memory_allocated``."""

_WIDTH, _DEPTH = 2048, 8
_BATCHES = (256, 1024, 4096, 16384)
_QUICK_BATCHES = (256, 1024)


def warm_up(workload: Workload) -> None:
    """One plain forward and backward, then the gradients set to None: cuBLAS's workspaces
    exist from here on, and the workload's state is as it was (no optimizer step)."""
    output = workload.forward()
    loss, _ = compute_loss(workload, output)
    loss.backward()
    del output, loss
    workload.model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()


def outside_bytes(workload: Workload, device: torch.device) -> int:
    """Bytes the allocator holds now beyond the workload's own state (parameters, buffers,
    gradients, inputs, targets and optimizer state, each storage once, rounded as the allocator
    rounds): cuBLAS's workspaces and any other tensor of the process. A peak read from
    ``max_memory_allocated`` less this is comparable with a budget on the training peak."""
    tensors: list[torch.Tensor] = [*workload.model.parameters(), *workload.model.buffers(),
                                   *workload.inputs]
    tensors += [p.grad for p in workload.model.parameters() if p.grad is not None]
    if workload.targets is not None:
        tensors.append(workload.targets)
    if workload.optimizer is not None:
        for state in workload.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    storages: dict[int, int] = {}
    for tensor in tensors:
        if tensor.device == device:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    state = sum(-(-n // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES for n in storages.values())
    return max(0, allocated_bytes(device) - state)


def report_name(gpu: str) -> str:
    """``gpu-nvidia-h200`` for "NVIDIA H200": the report's file stem, named after the GPU."""
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def _case(config: SeedConfig, backend: CudaDevice, steps: int) -> tuple[dict[str, Any], list[Any]]:
    workload = seed_workload(config)
    warm_up(workload)
    profile = memprop.profile(workload)
    layers = gpu_layers(backend, profile.training_peak_bytes) or ()
    measured = (profile.measured.training_peak_bytes if profile.measured is not None
                else profile.training_peak_bytes)
    error = (profile.training_peak_bytes - measured) / max(1, measured)
    budget = profile.training_peak_bytes - profile.saved_activations_bytes // 2
    try:
        plan = make_plan(workload, budget=budget)
    except BudgetInfeasibleError as infeasible:
        budget = infeasible.min_feasible_bytes
        plan = make_plan(workload, budget=budget)
    workload.model.zero_grad(set_to_none=True)
    run = run_plan(workload, plan, steps=steps)
    assert run.baseline_peak_bytes is not None and run.baseline_step_s is not None  # baseline ran
    # The allocator's figure: the step's state plus max_memory_allocated's rise over the step,
    # so the process's other tensors (cuBLAS's workspaces) are already outside it.
    planned_peak = run.allocator_peak_bytes
    unplanned_peak = run.baseline_allocator_peak_bytes or run.baseline_peak_bytes
    row = {
        "batch": config.batch,
        "ledger peak": format_bytes(profile.training_peak_bytes),
        "max_memory_allocated": format_bytes(measured),
        "ledger error": f"{error:+.2%}",
        "met": "yes" if abs(error) <= LEDGER_GOAL else "no",
        "reserved": format_bytes(layers[1].bytes) if len(layers) > 1 else "",
        "budget": format_bytes(budget),
        "planned peak": format_bytes(planned_peak),
        "planned peak (ledger)": format_bytes(run.peak_bytes),
        "within budget": "yes" if planned_peak <= budget else "no",
        "unplanned peak": format_bytes(unplanned_peak),
        "unplanned peak (ledger)": format_bytes(run.baseline_peak_bytes),
        "planned step (ms)": run.step_s * 1e3,
        "unplanned step (ms)": run.baseline_step_s * 1e3,
        "gradients match": "yes" if run.gradients_match else "no",
        "ledger_peak_bytes": profile.training_peak_bytes,
        "measured_peak_bytes": measured,
        "budget_bytes": budget,
        "planned_peak_bytes": planned_peak,
        "planned_ledger_peak_bytes": run.peak_bytes,
        "unplanned_peak_bytes": unplanned_peak,
        "unplanned_ledger_peak_bytes": run.baseline_peak_bytes,
        "predicted_peak_bytes": plan.peak_bytes,
    }
    del workload, profile, plan, run
    torch.cuda.empty_cache()
    return row, list(layers)


def gpu_report(*, quick: bool = False, device: str = "cuda") -> BenchReport | None:
    """The GPU benchmark, named after the GPU; None without a CUDA device."""
    if not torch.cuda.is_available():
        return None
    backend = CudaDevice(device)
    name = str(backend.describe()["name"])
    rows: list[dict[str, Any]] = []
    largest: list[Any] = []
    for batch in _QUICK_BATCHES if quick else _BATCHES:
        config = SeedConfig(input_dim=_WIDTH, hidden=_WIDTH, classes=10, depth=_DEPTH,
                            batch=batch, device=backend.name)
        row, largest = _case(config, backend, steps=3 if quick else 10)
        rows.append(row)
    worst = max(abs(r["ledger_peak_bytes"] - r["measured_peak_bytes"]) /
                max(1, r["measured_peak_bytes"]) for r in rows)
    summary = [
        f"- {name}: seed MLP, width {_WIDTH}, depth {_DEPTH}, float32, SGD; batches "
        f"{', '.join(str(r['batch']) for r in rows)}.",
        f"- The ledger's training peak against torch.cuda.max_memory_allocated after a cuBLAS "
        f"warm-up: worst {worst:.2%} (goal <= {LEDGER_GOAL:.0%}: "
        f"{'met' if worst <= LEDGER_GOAL else 'missed'}).",
        "- Planned runs (budget: the unplanned peak less half the saved activations, or the "
        "least feasible budget) measured by the allocator (the step's state plus "
        "max_memory_allocated's rise over the step, memprop.devices.allocator), the ledger's "
        "figure beside it: "
        f"{sum(r['within budget'] == 'yes' for r in rows)} of {len(rows)} within budget; step "
        "times are medians.",
        "- Layers at the largest batch: " + "; ".join(
            f"{layer.name} {format_bytes(layer.bytes)}" for layer in largest) + ".",
    ]
    summary += [f"- advice: {layer.advice}" for layer in largest if layer.advice]
    return BenchReport(
        name=report_name(name),
        title=f"memprop on {name}: ledger, allocator and NVML, planned and unplanned",
        summary=summary,
        columns=[c for c in rows[0] if not c.endswith("_bytes")],
        rows=rows,
    )
