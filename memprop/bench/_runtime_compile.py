"""The torch.compile contenders, run in a child process so that their compile time can be
capped (a process can be killed; a compile in progress cannot be interrupted) and so that a
compiler failure cannot take the benchmark down.

The child writes one JSON document to a file after every measurement, so what it measured before
a timeout survives it. It compiles every contender first (each one's first step), then times
them interleaved with the eager step (``interleaved_medians``): the ratios are between medians
of one process's interleaved steps.

# NOTE [ The peak of a compiled step ]
The storage ledger is a dispatch mode, and inductor's generated code allocates its buffers
without going through the dispatcher, so the ledger would not see them. The child reads the peak
from the allocator's own count (``memprop.devices.allocator.AllocatorMeter``: the profiler's
allocation events, every allocation and free of the CPU allocator, in order), plus the bytes
live before a steady-state step (parameters, inputs, targets and the optimizer's state, made by
a step before; the step starts with gradients set to None). The child measures the eager step
the same way, and the report sets it beside the ledger's.

# NOTE [ One compiled contender, one backend ]
Dynamo keeps one cache per code object and reuses an entry whose backend compares equal: two
plain ``torch.compile(model)`` calls would share the graphs compiled first, whatever
``activation_memory_budget`` was set for the second. Each contender is compiled with a backend
of its own (a fresh closure over inductor's ``compile_fx``), so they live side by side and can
be interleaved. The budget is read by the partitioner when the forward is compiled, during the
contender's first step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memprop.bench.common import interleaved_medians
from memprop.devices.allocator import AllocatorMeter, step_state_tensors
from memprop.loop import training_step, zero_gradients
from memprop.workload import Workload

__all__ = ["COMPILE_BUDGETS", "compiled_points", "own_compiled", "run_child"]

COMPILE_BUDGETS = (1.0, 0.5)
"""``torch._functorch.config.activation_memory_budget`` values: 1.0 is the default partitioner,
lower ones ask it to recompute until that fraction of the activation memory is kept."""


def run_child(module: str, arguments: list[str], *, timeout_s: float
              ) -> tuple[dict[str, Any] | None, str | None]:
    """Run ``python -m module *arguments OUT`` on one thread, killed after ``timeout_s``: the
    JSON document it last wrote to OUT (None when none), and why it did not finish (None when
    it did)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "child.json"
        command = [sys.executable, "-m", module, *arguments, str(out)]
        reason = None
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                reason = f"the child exited with {done.returncode}: {last[:200]}"
        except subprocess.TimeoutExpired:
            reason = f"it ran past its {timeout_s:.0f} s cap"
        document = json.loads(out.read_text()) if out.exists() else None
    return document, reason


def compiled_points(case: str, batch: int, *, repeats: int, timeout_s: float
                    ) -> tuple[list[dict[str, Any]], str | None]:
    """The compiled step's points (and the eager step's, from the same process) for each
    budget, and why the contender did not run in full (``None`` when it did)."""
    document, reason = run_child("memprop.bench._runtime_compile",
                                 [case, str(batch), str(repeats)], timeout_s=timeout_s)
    points = document["points"] if document else []
    if document is not None and not document.get("finished") and reason is None:
        reason = "the child stopped before timing its contenders"
    return points, reason


def own_compiled(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile(model)`` with a backend of its own (NOTE [ One compiled contender, one
    backend ]): ``inductor``, or a registered backend's name."""
    from torch._dynamo.backends.registry import lookup_backend
    from torch._inductor.compile_fx import compile_fx

    inner: Callable[..., Any] = compile_fx if backend == "inductor" else lookup_backend(backend)

    def own_backend(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
        return inner(graph, inputs)

    compiled: nn.Module = torch.compile(model, backend=own_backend)  # type: ignore[assignment]
    return compiled


def steady_peak_bytes(workload: Workload, step: Callable[[], None]) -> int:
    """The allocator's peak over a steady-state ``step`` of ``workload`` (one ran before it:
    the optimizer's state exists), gradients freed before it (NOTE [ The peak of a compiled
    step ])."""
    zero_gradients(workload)
    meter = AllocatorMeter("cpu", step_state_tensors(workload))
    with meter:
        step()
    assert meter.result is not None
    return meter.result.peak_bytes


def _main(case: str, batch: int, repeats: int, out: Path) -> None:
    import torch._functorch.config as functorch_config

    from memprop.bench._runtime_workloads import build

    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # one cache entry per compiled contender
    workload = build(case, batch)

    def stepper(model: nn.Module, budget: float = 1.0) -> Callable[[], None]:
        chosen = dataclasses.replace(workload, model=model)

        def step() -> None:
            zero_gradients(chosen)
            # The budget around every step: a recompile (a guard that fails) reads it again.
            with functorch_config.patch(activation_memory_budget=budget):
                training_step(chosen)
        return step

    eager = stepper(workload.model)
    eager()  # the optimizer's state exists from here on: the steady state
    eager_peak = steady_peak_bytes(workload, eager)
    points: list[dict[str, Any]] = []
    steps = {"eager": eager}
    for fraction in COMPILE_BUDGETS:
        step = stepper(own_compiled(workload.model), fraction)
        started = time.perf_counter()
        step()  # compiles forward and backward
        compile_s = time.perf_counter() - started
        points.append({"activation_memory_budget": fraction, "compile_s": compile_s,
                       "peak_bytes": steady_peak_bytes(workload, step),
                       "eager_peak_bytes": eager_peak})
        steps[str(fraction)] = step
        out.write_text(json.dumps({"points": points}))
    times = interleaved_medians(steps, repeats=repeats, warmup=1)
    for point in points:
        point |= {"step_s": times[str(point["activation_memory_budget"])],
                  "eager_step_s": times["eager"]}
    out.write_text(json.dumps({"points": points, "finished": True}))


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
