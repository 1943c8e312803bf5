"""The torch.compile contender, run in a child process so that its compile time can be capped
(a process can be killed; a compile in progress cannot be interrupted) and so that a compiler
failure cannot take the benchmark down.

The child writes one JSON document to a file after every measurement, so what it measured before
a timeout survives it.

# NOTE [ The peak of a compiled step ]
The storage ledger is a dispatch mode, and inductor's generated code allocates its buffers
without going through the dispatcher, so the ledger would not see them. The child reads the peak
from the profiler's allocation events instead (``profile_memory=True``: every allocation and
free of the CPU allocator, in order), plus the bytes live before a steady-state step
(parameters, inputs, targets and the optimizer's state, made by a step before; the step starts
with gradients set to None). On the eager step this count agrees with the ledger to the byte;
the child measures the eager step as well, and the report shows both.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["COMPILE_BUDGETS", "compiled_points"]

COMPILE_BUDGETS = (1.0, 0.5)
"""``torch._functorch.config.activation_memory_budget`` values: 1.0 is the default partitioner,
lower ones ask it to recompute until that fraction of the activation memory is kept."""


def compiled_points(case: str, batch: int, *, repeats: int, timeout_s: float
                    ) -> tuple[list[dict[str, Any]], str | None]:
    """The compiled step's points (and the eager step's, from the same process) for each
    budget, and why the contender did not run in full (``None`` when it did)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "compile.json"
        command = [sys.executable, "-m", "memprop.bench._runtime_compile", case, str(batch),
                   str(repeats), str(out)]
        reason = None
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                reason = f"the child exited with {done.returncode}: {last[:200]}"
        except subprocess.TimeoutExpired:
            reason = f"compiling took more than the {timeout_s:.0f} s cap"
        points = json.loads(out.read_text())["points"] if out.exists() else []
    return points, reason


def _allocation_peak_bytes(step: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _main(case: str, batch: int, repeats: int, out: Path) -> None:
    import torch
    import torch._functorch.config as functorch_config

    from memprop.bench._runtime_workloads import build
    from memprop.loop import compute_loss

    torch.set_num_threads(1)
    workload = build(case, batch)
    optimizer = workload.optimizer
    assert optimizer is not None

    def stepper(model: Callable[..., Any]) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            output = model(*workload.inputs)
            loss, _ = compute_loss(workload, output)
            loss.backward()
            optimizer.step()
            del output, loss
        return step

    def timed(step: Callable[[], None]) -> float:
        step()
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    points: list[dict[str, Any]] = []
    eager = stepper(workload.model)
    eager()  # the optimizer's state exists from here on: the steady state
    # What is live before each step: parameters, inputs, targets and the optimizer's state.
    before = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (
        *workload.model.parameters(), *workload.inputs,
        *([workload.targets] if workload.targets is not None else []),
        *(v for state in optimizer.state.values() for v in state.values()
          if isinstance(v, torch.Tensor)))}
    before_bytes = sum(before.values())
    eager_peak = before_bytes + _allocation_peak_bytes(eager)
    eager_s = timed(eager)
    for fraction in COMPILE_BUDGETS:
        torch._dynamo.reset()
        functorch_config.activation_memory_budget = fraction
        step = stepper(torch.compile(workload.model))
        started = time.perf_counter()
        step()  # compiles forward and backward
        compile_s = time.perf_counter() - started
        points.append({
            "activation_memory_budget": fraction, "compile_s": compile_s,
            "peak_bytes": before_bytes + _allocation_peak_bytes(step), "step_s": timed(step),
            "eager_peak_bytes": eager_peak, "eager_step_s": eager_s,
        })
        out.write_text(json.dumps({"points": points}))


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
