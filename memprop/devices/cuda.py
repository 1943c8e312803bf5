"""A CUDA GPU: the caching allocator's statistics and NVML's view of the whole device.

This is the only module that imports ``pynvml`` (from the ``nvidia-ml-py`` package).

NOTE [ NVML's lifetime ]
NVML is started once, on first use, by ``_NvmlSession.module()`` and shut down at interpreter
exit (``atexit``); no call here starts or stops it again. A missing package, a missing driver
library or an ``NVMLError`` at start-up is recorded as a sentence (``nvml_status()``, and the
``nvml`` entry of ``describe()``): the allocator's figures keep working without NVML.

NOTE [ Which GPU NVML means ]
NVML numbers every GPU on the machine in PCI order; CUDA numbers only the visible ones, in
``CUDA_VISIBLE_DEVICES`` order (and fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``). So
``cuda:1`` is looked up in NVML by the UUID that CUDA reports for it, and only where that fails
by the entry of ``CUDA_VISIBLE_DEVICES`` at its position (``nvml_index``).

Known limitations: inside a container with its own PID namespace NVML lists processes by their
host PIDs, so this process's own use cannot be found (``process_bytes`` is None and
``process_note`` says why); on MIG slices and under WDDM NVML gives no per-process figures at all.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from memprop.devices.reconcile import Layer, reconcile
from memprop.errors import DeviceUnavailableError, UsageError

__all__ = [
    "CudaDevice",
    "CudaMemory",
    "NvmlMemory",
    "allocated_bytes",
    "nvml_index",
    "nvml_memory",
    "nvml_status",
    "peak_allocated_bytes",
    "reset_peak",
]


class _NvmlSession:
    """pynvml once initialised, or why it could not be (see NOTE [ NVML's lifetime ])."""

    def __init__(self) -> None:
        self.started = False
        self.error: str | None = None
        """Why NVML did not start."""
        self.read_error: str | None = None
        """Why the last read of a GPU failed, NVML having started."""
        self._module: Any = None

    def module(self) -> Any | None:
        if self.started:
            return self._module
        self.started = True
        try:
            import pynvml
        except ImportError as error:
            self.error = (f"NVML unavailable: the nvidia-ml-py package is missing ({error}): "
                          "pip install nvidia-ml-py")
            return None
        try:
            pynvml.nvmlInit()
        except (pynvml.NVMLError, OSError) as error:
            self.error = (f"NVML unavailable: nvmlInit failed ({type(error).__name__}: {error}): "
                          "check that the NVIDIA driver is installed and libnvidia-ml.so.1 is on "
                          "the library path")
            return None
        self._module = pynvml
        atexit.register(self.shutdown)
        return pynvml

    def shutdown(self) -> None:
        module, self._module = self._module, None
        if module is not None:
            with contextlib.suppress(module.NVMLError):
                module.nvmlShutdown()


_session = _NvmlSession()
_context_cache: dict[int, int] = {}


def nvml_status() -> str:
    """``"ok"``, or why NVML figures are missing."""
    return "ok" if _session.module() is not None else str(_session.error)


@dataclass(frozen=True, kw_only=True, slots=True)
class NvmlMemory:
    """One GPU's memory as NVML (and ``nvidia-smi``) counts it."""

    total_bytes: int
    free_bytes: int
    used_bytes: int
    """The whole device: every process, the driver's reserve included."""
    process_bytes: int | None
    """This process's use (its CUDA context, libraries and allocator reserve); None when NVML
    will not say (``process_note`` says why)."""
    process_note: str


def nvml_index(cuda_index: int, visible: str | None) -> int:
    """NVML's index for ``cuda:N`` from ``CUDA_VISIBLE_DEVICES`` (None: unset): the entry at
    position N when it is a number, else N itself."""
    if visible is None:
        return cuda_index
    entries = [entry.strip() for entry in visible.split(",")]
    if cuda_index < len(entries) and entries[cuda_index].isdigit():
        return int(entries[cuda_index])
    return cuda_index


def _handle(nvml: Any, uuid: str | None, index: int) -> Any:
    """The NVML handle of the GPU with this CUDA ``uuid``, else of NVML index ``index``."""
    if uuid:
        for prefix in ("GPU-", "MIG-"):
            with contextlib.suppress(nvml.NVMLError):
                return nvml.nvmlDeviceGetHandleByUUID(prefix + uuid)
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_memory(*, uuid: str | None, index: int, pid: int | None = None) -> NvmlMemory | None:
    """NVML's figures for one GPU (found as ``_handle`` does), or None without NVML."""
    nvml = _session.module()
    if nvml is None:
        return None
    try:
        handle = _handle(nvml, uuid, index)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    except nvml.NVMLError as error:
        _session.read_error = f"NVML could not read GPU {uuid or index}: {error}"
        return None
    pid = os.getpid() if pid is None else pid
    try:
        processes = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
    except nvml.NVMLError as error:
        return NvmlMemory(total_bytes=int(info.total), free_bytes=int(info.free),
                          used_bytes=int(info.used), process_bytes=None,
                          process_note=f"NVML refused per-process figures ({error})")
    mine = [p for p in processes if p.pid == pid]
    figures = [p.usedGpuMemory for p in mine if _known(p.usedGpuMemory)]
    if figures:
        process_bytes: int | None = int(sum(figures))
        note = "ok"
    elif mine:
        process_bytes, note = None, "NVML lists this process without a figure (MIG or WDDM)"
    else:
        process_bytes = None
        note = (f"NVML lists no process with PID {pid} (a container's PID namespace hides it, "
                "or this process has no CUDA context yet)")
    return NvmlMemory(total_bytes=int(info.total), free_bytes=int(info.free),
                      used_bytes=int(info.used), process_bytes=process_bytes, process_note=note)


def _known(value: Any) -> bool:
    # NVML_VALUE_NOT_AVAILABLE is the unsigned -1; pynvml turns it into None on some versions.
    return value is not None and 0 <= int(value) < 2**64 - 1


@dataclass(frozen=True, kw_only=True, slots=True)
class CudaMemory:
    """The caching allocator's figures since the last ``reset_peak``, and NVML's now."""

    allocated_bytes: int
    reserved_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    nvml: NvmlMemory | None


_CUDA_NAME = re.compile(r"^cuda(?::(\d+))?$")


def reset_peak(device: torch.device) -> None:
    """Start the allocator's high-water mark for ``device`` afresh, its queued work done."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)


def allocated_bytes(device: torch.device) -> int:
    """Bytes of the live tensors the caching allocator holds for ``device``."""
    return int(torch.cuda.memory_allocated(device))


def peak_allocated_bytes(device: torch.device) -> int:
    """The allocator's high-water mark for ``device`` since :func:`reset_peak`, its queued
    work done: the one place memprop reads a GPU's peak."""
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


class CudaDevice:
    """One GPU through ``torch.cuda`` (tensor bytes and the allocator's reserve) and NVML."""

    def __init__(self, name: str = "cuda") -> None:
        match = _CUDA_NAME.match(name.strip())
        if match is None:
            raise UsageError(f"device {name!r} is not a CUDA device: write cuda or cuda:N "
                             "(N counts from 0)")
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {name}: no CUDA GPU is visible to PyTorch "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): "
                "run on a machine with an NVIDIA GPU or use the CPU (device cpu)"
            )
        count = torch.cuda.device_count()
        index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
        if index >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            shown = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible})"
            raise DeviceUnavailableError(
                f"device {name}: PyTorch sees {count} GPU(s){shown}, numbered 0 to "
                f"{count - 1}: pick one of those"
            )
        self.index = index
        self.name = f"cuda:{index}"
        self.torch_device = torch.device("cuda", index)

    # The interface every backend answers (memprop.devices.base.MemoryDevice).

    def reset_peak(self) -> None:
        reset_peak(self.torch_device)

    def current_bytes(self) -> int:
        return allocated_bytes(self.torch_device)

    def peak_bytes(self) -> int:
        return peak_allocated_bytes(self.torch_device)

    def available_bytes(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.torch_device)
        return int(free)

    # The allocator and NVML.

    def reserved_bytes(self) -> int:
        return int(torch.cuda.memory_reserved(self.torch_device))

    def peak_reserved_bytes(self) -> int:
        return int(torch.cuda.max_memory_reserved(self.torch_device))

    def headroom_bytes(self) -> int:
        """The most a training peak could reach now: the device's free memory plus everything
        this process's allocator holds (its live tensors count towards the peak, its cached
        blocks can be reused). The CUDA context is already outside it: asking CUDA for its free
        memory creates the context first."""
        return self.available_bytes() + self.reserved_bytes()

    def nvml_memory(self) -> NvmlMemory | None:
        """NVML's total, free and used bytes for this GPU and this process's use."""
        return nvml_memory(uuid=self._uuid(), index=self._nvml_index())

    def snapshot(self) -> CudaMemory:
        torch.cuda.synchronize(self.torch_device)
        return CudaMemory(
            allocated_bytes=self.current_bytes(),
            reserved_bytes=self.reserved_bytes(),
            peak_allocated_bytes=self.peak_bytes(),
            peak_reserved_bytes=self.peak_reserved_bytes(),
            nvml=self.nvml_memory(),
        )

    def context_bytes(self) -> int:
        """What the CUDA context and the libraries loaded with it cost this process beyond the
        allocator's reserve: NVML's figure for this process less ``memory_reserved``, measured
        once per GPU (0 when NVML cannot say)."""
        cached = _context_cache.get(self.index)
        if cached is not None:
            return cached
        torch.empty(1, device=self.torch_device)  # the context exists from here on
        torch.cuda.synchronize(self.torch_device)
        memory = self.nvml_memory()
        used = memory.process_bytes if memory is not None else None
        context = max(0, used - self.reserved_bytes()) if used else 0
        _context_cache[self.index] = context
        return context

    def layers(self, tensor_bytes: int | None = None) -> list[Layer]:
        """The reconciliation (``memprop.devices.reconcile``) of the step since the last
        ``reset_peak``: ``tensor_bytes`` (the ledger's peak; by default the allocator's), the
        allocator's peaks, and NVML now."""
        memory = self.snapshot()
        nvml = memory.nvml
        return reconcile(
            tensor_bytes=memory.peak_allocated_bytes if tensor_bytes is None else tensor_bytes,
            allocated_bytes=None if tensor_bytes is None else memory.peak_allocated_bytes,
            reserved_bytes=memory.peak_reserved_bytes,
            process_bytes=None if nvml is None else nvml.process_bytes,
            device_used_bytes=None if nvml is None else nvml.used_bytes,
            device_total_bytes=None if nvml is None else nvml.total_bytes,
        )

    def describe(self) -> dict[str, Any]:
        properties = torch.cuda.get_device_properties(self.torch_device)
        described: dict[str, Any] = {
            "type": "cuda",
            "index": self.index,
            "name": properties.name,
            "total_bytes": int(properties.total_memory),
            "device_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "nvml": nvml_status(),
        }
        nvml = _session.module()
        if nvml is not None:
            with contextlib.suppress(nvml.NVMLError):
                described["driver"] = _text(nvml.nvmlSystemGetDriverVersion())
            memory = self.nvml_memory()
            if memory is None:
                described["nvml"] = str(_session.read_error)
            else:
                described["nvml_total_bytes"] = memory.total_bytes
                described["nvml_used_bytes"] = memory.used_bytes
                described["process_bytes"] = memory.process_bytes
                if memory.process_bytes is None:
                    described["process_note"] = memory.process_note
        return described

    def _uuid(self) -> str | None:
        uuid = getattr(torch.cuda.get_device_properties(self.torch_device), "uuid", None)
        return None if uuid is None else str(uuid)

    def _nvml_index(self) -> int:
        return nvml_index(self.index, os.environ.get("CUDA_VISIBLE_DEVICES"))
