"""Kernels' scratch: memory an op allocates and frees inside itself, measured by the allocator.

NOTE [ Scratch the ledger cannot see ]
The storage ledger (``memprop.trace.ledger``) sees a step at the dispatcher: every op's outputs,
born and freed. A kernel may allocate more inside one op and free it before the op returns
(oneDNN's scratchpads and reordered weights in a CPU convolution or a bfloat16 matmul, cuDNN's
and cuBLAS's workspaces on a GPU): the dispatcher never sees those blocks, so neither the ledger
nor the planner, whose figures come from it, counts them. The allocator does. A plan made for
the whole budget is then exceeded by the scratch of the op that runs at its peak: a vision
transformer's patch embedding (a 16x16 convolution of stride 16) allocates more scratch than
the rest of a small step holds.

An op's scratch is the allocator's peak inside it above the larger of what was live before it
and after it: what it allocated and freed within itself, and nothing else (an op's outputs
are live after it; its inputs are not freed inside it). It depends on the op and its shapes
only, not on the plan: a recomputed forward runs the same ops on the same shapes. So the
largest scratch of any op of one real step bounds what the allocator can count above the ledger
at any moment of any plan of that step, and a plan made for the budget less that scratch keeps
the allocator's peak within the budget. It is measured on one real step, the state put back
after it, where memprop runs real steps anyway (``memprop run``; ``memprop.checkpoint`` with
``cost_model="measured"``); fake tensors allocate nothing, so a plan made on them alone excludes
the scratch from its budget, and says so.

Per op, on the CPU: one torch.profiler session of the allocator's events over the step
(``memprop.devices.allocator``), each op bracketed by two one-byte marker allocations from a
dispatch mode, whose addresses find the op's events among the others. On CUDA: the caching
allocator's peak reset before each op and read after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memprop.devices import cuda
from memprop.devices.allocator import AllocatorMeter, step_state_tensors
from memprop.errors import BudgetInfeasibleError
from memprop.loop import training_step, zero_gradients
from memprop.plan.solvers import Plan, cli_size
from memprop.run.install import installed
from memprop.trace.compiled import eager_model
from memprop.trace.ledger import op_name
from memprop.units import format_bytes
from memprop.workload import Workload, restore_state, save_state

__all__ = ["MARK_BYTES", "Scratch", "measure_scratch", "plan_around", "scratch_line",
           "unmeasured_note"]

MARK_BYTES = 1
"""The size of the marker allocations that bracket each op on the CPU."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Scratch:
    """The largest scratch of any op of one real training step."""

    bytes: int
    """The allocator's peak inside that op above the larger of what was live before and after
    it (0: no op allocated scratch)."""
    op: str
    """The op that allocated it (empty when ``bytes`` is 0)."""
    ops: int
    """Ops measured."""


def measure_scratch(workload: Workload, plan: Plan | None = None) -> Scratch:
    """Run one real training step of ``workload`` (as the loop does: zero_grad, forward, loss,
    backward, optimizer step), under ``plan`` where one is given (a step that may not fit the
    device unplanned), and measure the largest scratch of its ops, then put the workload back
    as it was (parameters, buffers, gradients, optimizer state, random state). An op's scratch
    is the same under any plan: the plan only decides which ops run twice."""
    device = next((p.device for p in workload.model.parameters()),
                  workload.input_tensors[0].device)
    state = save_state(workload)
    try:
        zero_gradients(workload)
        # A compiled model runs its original module, as its plan does (NOTE [ Compiled models
        # are traced eagerly ]): dynamo would compile the dispatch mode into the step.
        with eager_model(workload, []), contextlib.ExitStack() as around:
            if plan is not None:
                around.enter_context(installed(
                    workload.model, plan.stage_names, plan.tree, plan.selective,
                    plan.draws_random, head_chunks=plan.head_chunks))
            if device.type == "cuda":
                return _measured_cuda(workload, device)
            return _measured_cpu(workload, device)
    finally:
        restore_state(workload, state)


def plan_around(make: Callable[[int], Plan], budget_bytes: int, scratch: Scratch) -> Plan:
    """The plan ``make(budget)`` makes for ``budget_bytes`` less the scratch, said to be for
    ``budget_bytes`` (the cap the user asked for, which the allocator's peak is held to). A
    budget that only the scratch makes infeasible says so, with the least budget that fits
    counting it."""
    try:
        planned = make(budget_bytes - scratch.bytes)
    except BudgetInfeasibleError as error:
        least = error.min_feasible_bytes + scratch.bytes
        raise BudgetInfeasibleError(
            f"budget {format_bytes(budget_bytes)} less the {format_bytes(scratch.bytes)} of "
            f"scratch its kernels allocate inside one op ({scratch.op}, measured by the "
            f"allocator) is below the smallest feasible peak, "
            f"{format_bytes(error.min_feasible_bytes)}: raise the budget to at least "
            f"{cli_size(least)} or lower the batch size",
            budget_bytes=budget_bytes, min_feasible_bytes=least) from error
    return dataclasses.replace(planned, budget_bytes=budget_bytes,
                               feasible=planned.peak_bytes + scratch.bytes <= budget_bytes,
                               min_feasible_bytes=planned.min_feasible_bytes + scratch.bytes)


class _Marks(TorchDispatchMode):
    """Before and after each op, a one-byte allocation freed at once: its address, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.addresses: list[int] = []
        self.names: list[str] = []

    def _mark(self) -> None:
        marker = torch.empty(MARK_BYTES, dtype=torch.uint8)
        self.addresses.append(marker.data_ptr())
        del marker

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        self.names.append(op_name(func))
        self._mark()
        out = func(*args, **(kwargs or {}))
        self._mark()
        return out


def _measured_cpu(workload: Workload, device: torch.device) -> Scratch:
    marks = _Marks()  # inside the meter's session: its markers are among the events
    meter = AllocatorMeter(device, step_state_tensors(workload))
    with meter, marks:
        training_step(workload)
    return _largest(meter.events, marks)


def _largest(events: list[tuple[int, int, int, int]], marks: _Marks) -> Scratch:
    """Replay the allocator's events; between an op's two markers, its peak above the larger
    of the live bytes at the two."""
    live = 0
    at_mark = 0  # live bytes at the op's first marker
    high = 0  # the highest live bytes since it
    best, best_op = 0, ""
    index = 0  # the next marker expected
    for _, _, address, size in events:
        if index < len(marks.addresses) and size == MARK_BYTES \
                and address == marks.addresses[index]:
            if index % 2 == 0:
                at_mark = high = live
            else:
                scratch = high - max(at_mark, live)
                if scratch > best:
                    best, best_op = scratch, marks.names[index // 2]
            index += 1
            continue
        if size == -MARK_BYTES and index and address == marks.addresses[index - 1]:
            continue  # the marker's own free
        live += size
        high = max(high, live)
    return Scratch(bytes=best, op=best_op, ops=index // 2)


class _CudaPeaks(TorchDispatchMode):
    """Each op's scratch on CUDA: the caching allocator's peak reset before it, read after."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.best, self.best_op, self.ops = 0, "", 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        # No synchronize: the caching allocator hands out blocks as kernels are launched.
        torch.cuda.reset_peak_memory_stats(self.device)
        before = cuda.allocated_bytes(self.device)
        out = func(*args, **(kwargs or {}))
        after = cuda.allocated_bytes(self.device)
        scratch = int(torch.cuda.max_memory_allocated(self.device)) - max(before, after)
        self.ops += 1
        if scratch > self.best:
            self.best, self.best_op = scratch, op_name(func)
        return out


def _measured_cuda(workload: Workload, device: torch.device) -> Scratch:
    peaks = _CudaPeaks(device)
    with peaks:
        training_step(workload)
    return Scratch(bytes=peaks.best, op=peaks.best_op, ops=peaks.ops)


def scratch_line(scratch: Scratch, budget_bytes: int) -> str:
    """What a report says of the scratch a plan was made around, in one line."""
    return (f"kernels' scratch the ledger cannot see: {format_bytes(scratch.bytes)} (in "
            f"{scratch.op}), measured by the allocator on a real step; planned for the budget "
            f"less the scratch, {format_bytes(budget_bytes - scratch.bytes)}")


def unmeasured_note() -> str:
    """What a plan made on fake tensors alone says of the scratch it could not measure."""
    return ("the budget excludes kernels' scratch (memory an op allocates and frees inside "
            "itself, such as oneDNN's in a CPU convolution or cuDNN's workspaces), which fake "
            "tensors cannot measure: leave room for it, or plan on a real step")
