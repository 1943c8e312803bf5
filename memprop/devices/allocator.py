"""The allocator's own count of a region's peak: what memprop calls "measured".

The storage ledger (``memprop.trace.ledger``) predicts; this module checks, by a mechanism that
shares nothing with it (DESIGN: the rule for "measured"). On CUDA the caching allocator keeps
its own high-water mark (``torch.cuda.max_memory_allocated``). On the CPU, c10's allocator
reports every allocation and free to ``torch.profiler`` when ``profile_memory=True``: its
address, its size and the allocator's running total.

The peak of a region is the bytes live when it starts (the storages the caller names: parameters,
buffers, inputs, gradients, optimizer state, counted once each by data pointer, at their local
size for a sharded DTensor) plus the highest rise the allocator reports over the region.

NOTE [ What c10 reports on the CPU ]
c10's ``ProfiledCPUMemoryReporter`` learns a block's size only when the block is allocated while
a profiler with ``profile_memory=True`` runs (its size table). So:

- the bytes live at entry are not in its running total: the caller names them, and they are
  counted here by data pointer;
- a free is reported only for a block the table knows. A storage allocated before any
  profiling and freed inside the region is not reported (c10 logs "Memory block of unknown size
  was allocated before the profiling started" once). Callers end such storages before the region
  (``zero_grad(set_to_none=True)`` runs before it, not inside). Where one is freed inside anyway
  and its address is handed out again, the new allocation proves the old block is gone, and it
  is counted freed there (``unreported_frees``); until then it counts as live, so the figure can
  only read high;
- the table outlives a profiling session and is not told of frees made between sessions, so its
  running total (``total_allocated``) drifts from session to session. The count here uses the
  events' addresses and sizes only, and the sizes this region allocated itself;
- allocations and frees on threads the profiler does not follow (a thread started by Python, a
  communication library's own thread) are not reported; the autograd engine runs a CPU
  backward on the calling thread, which is followed.

The session records the allocator's events and no op (NOTE [ A session of memory events
only ]), so it costs about a millisecond per region plus a little per allocation (see ``memprop
bench --only ledger``); nothing timed runs under it. Kineto prints a line to the process's
stderr when a session starts and stops: those two calls run with file descriptor 2 sent to
/dev/null, unless the user set ``KINETO_LOG_LEVEL``.

Known limitations: blocks a kernel allocates outside c10's allocator (oneDNN's scratchpads,
BLAS workspaces) are not counted, as the ledger does not count them; a torch.profiler session
already running in the process is refused (kineto runs one at a time).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from memprop.devices import cuda
from memprop.errors import UsageError

if TYPE_CHECKING:
    from memprop.workload import Workload

__all__ = ["AllocatorMeter", "AllocatorPeak", "StepProbe", "allocator_source", "live_bytes",
           "step_state_tensors", "unaccounted_bytes"]

CUDA_BLOCK_BYTES = 512
"""The caching allocator's block size (kMinBlockSize in c10/cuda/CUDACachingAllocator.cpp):
``max_memory_allocated`` counts every block rounded up to it, so the named storages are too."""


def allocator_source(device: torch.device | str) -> str:
    """How the allocator's figure is obtained on ``device``, for reports."""
    if torch.device(device).type == "cuda":
        return ("torch.cuda.max_memory_allocated: the caching allocator's high-water mark over "
                "the step, plus the step's own state live before it")
    return ("c10's CPU allocator, every allocation and free reported to torch.profiler "
            "(profile_memory=True), plus the step's own state live before it (its storages "
            "counted once by data pointer)")


@dataclass(frozen=True, kw_only=True, slots=True)
class AllocatorPeak:
    """A region's peak as the allocator counts it."""

    peak_bytes: int
    """Bytes live at entry plus the allocator's highest rise over them during the region."""
    entry_bytes: int
    """The storages named live at entry, each counted once."""
    end_bytes: int
    """Live at the end of the region, counted the same way."""
    events: int
    """Allocations and frees the allocator reported (the CPU; 0 on CUDA, which keeps totals)."""
    unreported_frees: int
    """Blocks found freed only because their address was allocated again (see NOTE
    [ What c10 reports on the CPU ])."""
    read_s: float
    """Seconds spent reading the allocator's record after the region."""
    source: str


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)  # a DTensor's storage is its local shard
    return to_local() if callable(to_local) else tensor


def live_bytes(tensors: Iterable[torch.Tensor | None], device: torch.device | str
               ) -> dict[int, int]:
    """The storages of ``tensors`` on ``device``: bytes by data pointer, each storage once
    (views share one), empty storages left out."""
    device = torch.device(device)
    storages: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        local = _local(tensor)
        if local.device.type != device.type:
            continue
        storage = local.untyped_storage()
        if storage.nbytes() and storage.data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()
    return storages


def step_state_tensors(workload: Workload, *, training: bool = True) -> list[torch.Tensor]:
    """What a step of ``workload`` starts with: parameters, buffers, inputs and, in training,
    targets, the gradients there are and the optimizer's state (counted here, apart from the
    ledger's own registration)."""
    model = workload.model
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers(),
                                   *workload.input_tensors]
    if not training:
        return tensors
    if workload.targets is not None:
        tensors.append(workload.targets)
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if workload.optimizer is not None:
        for state in workload.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


class AllocatorMeter:
    """``with AllocatorMeter(device, existing):`` the region's peak, by the allocator's count,
    in ``.result`` after the block; ``existing`` names what is live at entry."""

    def __init__(self, device: torch.device | str,
                 existing: Iterable[torch.Tensor | None] = ()) -> None:
        self.device = torch.device(device)
        self._entry = live_bytes(existing, self.device)
        self._profiler = False
        self._before = 0
        self.result: AllocatorPeak | None = None
        self.events: list[tuple[int, int, int, int]] = []
        """On the CPU, after the block: every allocation and free the allocator reported, as
        (time ns, order, address, bytes: negative for a free), in time order."""

    def __enter__(self) -> AllocatorMeter:
        if self.device.type == "cuda":
            cuda.reset_peak(self.device)
            self._before = cuda.allocated_bytes(self.device)
            return self
        if self.device.type != "cpu":
            raise UsageError(f"device {self.device}: the allocator's peak is measured on cpu "
                             "and cuda only")
        if torch._C._autograd._profiler_enabled():
            raise UsageError("a torch.profiler session is already running: memprop measures "
                             "the allocator with a profiler session of its own, and kineto "
                             "runs one at a time; run memprop outside the profiler")
        with _quiet_stderr():
            _start_memory_session()
        self._profiler = True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.device.type == "cuda":
            rise = cuda.peak_allocated_bytes(self.device) - self._before
            end = cuda.allocated_bytes(self.device) - self._before
            entry = sum(-(-n // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
                        for n in self._entry.values())
            self.result = AllocatorPeak(
                peak_bytes=entry + max(0, rise), entry_bytes=entry, end_bytes=entry + end,
                events=0, unreported_frees=0, read_s=0.0, source=allocator_source(self.device))
            return
        with _quiet_stderr():
            results = torch._C._autograd._disable_profiler()
        if kind is None:
            started = time.perf_counter()
            self.events = sorted(_allocations(results))
            self.result = _count(self.events, self._entry, time.perf_counter() - started)


def unaccounted_bytes(result: AllocatorPeak, held_after: Iterable[torch.Tensor | None],
                      device: torch.device | str) -> int:
    """What the allocator still counts live after a region, beyond the storages ``held_after``
    it (a step's state after the step): blocks whose free it was not told of, such as those a
    communication library's thread releases (NOTE [ What c10 reports on the CPU ]), or that the
    step leaves held where ``held_after`` does not name them (a schedule's last outputs). Where
    it is the former, the peak can read high by up to this much; 0: everything accounted for."""
    return max(0, result.end_bytes - sum(live_bytes(held_after, device).values()))


class StepProbe:
    """The allocator as ``memprop.trace.step.trace_training`` reads a device: each
    ``reset_peak`` starts an :class:`AllocatorMeter` over what the workload's step starts with,
    ``peak_bytes`` ends it and returns the whole peak (``current_bytes`` is 0, so the rise the
    tracer computes is the peak itself). ``last`` holds the last region's figures."""

    name = "allocator"

    def __init__(self, workload: Workload, device: torch.device | str, *,
                 training: bool = True) -> None:
        self.workload = workload
        self.device = torch.device(device)
        self.training = training
        self._meter: AllocatorMeter | None = None
        self.last: AllocatorPeak | None = None

    _open: AllocatorMeter | None = None
    """The meter a probe started and has not ended: a traced step that raised leaves it open
    (the tracer reads ``peak_bytes`` only after a step that finished), and the next probe ends
    it, so that one failed step does not keep the profiler running."""

    def reset_peak(self) -> None:
        leaked, StepProbe._open = StepProbe._open, None
        if leaked is not None:
            leaked.__exit__(None, None, None)
        self._meter = AllocatorMeter(self.device, step_state_tensors(self.workload,
                                                                     training=self.training))
        self._meter.__enter__()
        StepProbe._open = self._meter

    def current_bytes(self) -> int:
        return 0

    def peak_bytes(self) -> int:
        meter, self._meter = self._meter, None
        assert meter is not None, "peak_bytes before reset_peak"
        StepProbe._open = None
        meter.__exit__(None, None, None)
        self.last = meter.result
        return 0 if self.last is None else self.last.peak_bytes


def _start_memory_session() -> None:
    """A kineto session that records the CPU allocator's events and no op.

    NOTE [ A session of memory events only ]
    ``torch.profiler.profile(profile_memory=True)`` also records every op (and the autograd
    engine's nodes) as an event: on a step of many small ops that costs up to 10x the step.
    The allocator reports to the session whatever scopes it records, so the session here
    records only ``RecordScope.USER_SCOPE`` (``record_function`` blocks, which memprop does not
    open): the allocation events are the same, at a fraction of the cost. The configuration is
    what ``torch.autograd.profiler.profile`` passes for ``profile_memory=True`` and nothing
    else; the session is read with ``experimental_event_tree`` as torch's own memory
    profiler reads it."""
    from torch._C._profiler import (
        ProfilerActivity,
        ProfilerConfig,
        ProfilerState,
        RecordScope,
        _ExperimentalConfig,
    )

    config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False,
                            _ExperimentalConfig())
    activities = {ProfilerActivity.CPU}
    autograd: Any = torch._C._autograd  # torch's stubs lack the scopes argument
    autograd._prepare_profiler(config, activities)
    autograd._enable_profiler(config, activities, {RecordScope.USER_SCOPE})


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for one call (kineto's start and stop lines), unless the
    user asked kineto for its log."""
    if os.environ.get("KINETO_LOG_LEVEL") is not None:
        yield
        return
    try:
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _allocations(results: Any) -> Iterator[tuple[int, int, int, int]]:
    """(time ns, order, address, bytes: negative for a free) of every CPU allocation event in a
    profiler's results, from its event tree (``torch.profiler._memory_profiler`` reads the same
    fields)."""
    from torch._C._profiler import _EventType

    stack = list(reversed(results.experimental_event_tree()))
    order = 0
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation:
            fields = node.typed[1]
            if fields.device.type == "cpu":
                yield node.start_time_ns, order, int(fields.ptr), int(fields.alloc_size)
                order += 1
        stack.extend(reversed(node.children))


def _count(events: list[tuple[int, int, int, int]], entry: dict[int, int], read_s: float
           ) -> AllocatorPeak:
    """Replay the events in time order over the storages live at entry (NOTE [ What c10
    reports on the CPU ]): each block is counted at the size it was allocated with."""
    before = dict(entry)  # named storages still live
    made: dict[int, int] = {}  # blocks allocated in the region, still live
    live = peak = sum(before.values())
    unreported = 0
    for _, _, address, size in sorted(events):
        if size > 0:
            for known in (made, before):
                if address in known:  # its free was not reported, but it is gone
                    live -= known.pop(address)
                    unreported += 1
            made[address] = size
            live += size
            peak = max(peak, live)
        elif address in made:
            live -= made.pop(address)
        elif address in before:
            live -= before.pop(address)
        # else: a block from before the region that the caller did not name: never counted
    return AllocatorPeak(peak_bytes=peak, entry_bytes=sum(entry.values()), end_bytes=live,
                         events=len(events), unreported_frees=unreported, read_s=read_s,
                         source=allocator_source("cpu"))
