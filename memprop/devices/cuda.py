"""A CUDA GPU: the caching allocator's statistics and NVML's view of the whole device.

This is the only module that imports ``pynvml`` (from the ``nvidia-ml-py`` package). NVML is
started once, on first use, and shut down at interpreter exit; a missing or broken NVML library
leaves the allocator figures working and says why in ``describe()``.
"""

from __future__ import annotations

import atexit
from typing import Any

import torch

from memprop.errors import DeviceUnavailableError

__all__ = ["CudaDevice", "nvml_status"]

_nvml_state: dict[str, Any] = {"started": False, "error": None, "module": None}
_context_cache: dict[int, int] = {}


def _nvml() -> Any | None:
    """The pynvml module once initialised, or None (the reason is in ``nvml_status()``)."""
    if _nvml_state["started"]:
        return _nvml_state["module"]
    _nvml_state["started"] = True
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # a missing driver library is a fact to report, not a crash
        _nvml_state["error"] = f"{type(error).__name__}: {error}"
        return None
    _nvml_state["module"] = pynvml
    atexit.register(pynvml.nvmlShutdown)
    return pynvml


def nvml_status() -> str:
    """``"ok"`` or why NVML figures are missing."""
    module = _nvml()
    return "ok" if module is not None else str(_nvml_state["error"])


class CudaDevice:
    """One GPU through ``torch.cuda`` (tensor bytes and the allocator's reserve) and NVML."""

    def __init__(self, name: str = "cuda") -> None:
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"--device {name}: no CUDA GPU is visible to PyTorch "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): "
                "run on a machine with an NVIDIA GPU or use --device cpu"
            )
        device = torch.device(name)
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                f"numbered 0 to {torch.cuda.device_count() - 1}"
            )
        self.index = index
        self.name = f"cuda:{index}"
        self.torch_device = torch.device("cuda", index)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.torch_device)
        torch.cuda.reset_peak_memory_stats(self.torch_device)

    def current_bytes(self) -> int:
        return int(torch.cuda.memory_allocated(self.torch_device))

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.torch_device)
        return int(torch.cuda.max_memory_allocated(self.torch_device))

    def reserved_bytes(self) -> int:
        return int(torch.cuda.memory_reserved(self.torch_device))

    def peak_reserved_bytes(self) -> int:
        return int(torch.cuda.max_memory_reserved(self.torch_device))

    def available_bytes(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.torch_device)
        return int(free)

    def nvml_memory(self) -> dict[str, int] | None:
        """The device's total, free and used bytes and this process's use, from NVML."""
        nvml = _nvml()
        if nvml is None:
            return None
        handle = nvml.nvmlDeviceGetHandleByIndex(self._nvml_index())
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        process_bytes = 0
        try:
            import os

            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    process_bytes = int(proc.usedGpuMemory)
        except nvml.NVMLError:
            pass  # per-process figures need privileges some containers lack
        return {
            "total_bytes": int(info.total),
            "free_bytes": int(info.free),
            "used_bytes": int(info.used),
            "process_bytes": process_bytes,
        }

    def context_bytes(self) -> int:
        """What the CUDA context and loaded libraries cost this process, beyond the allocator's
        reserve: NVML's per-process figure less ``memory_reserved``, measured once (0 when NVML
        cannot say)."""
        cached = _context_cache.get(self.index)
        if cached is not None:
            return cached
        torch.cuda.init()
        torch.empty(1, device=self.torch_device)  # make sure the context exists
        memory = self.nvml_memory()
        used = memory["process_bytes"] if memory else 0
        context = max(0, used - self.reserved_bytes()) if used else 0
        _context_cache[self.index] = context
        return context

    def _nvml_index(self) -> int:
        # NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES renumbers them for torch.
        import os

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            entries = [v.strip() for v in visible.split(",") if v.strip()]
            if self.index < len(entries) and entries[self.index].isdigit():
                return int(entries[self.index])
        return self.index

    def describe(self) -> dict[str, Any]:
        properties = torch.cuda.get_device_properties(self.torch_device)
        described: dict[str, Any] = {
            "type": "cuda",
            "index": self.index,
            "name": properties.name,
            "total_bytes": int(properties.total_memory),
            "cuda": torch.version.cuda,
            "nvml": nvml_status(),
        }
        nvml = _nvml()
        if nvml is not None:
            driver = nvml.nvmlSystemGetDriverVersion()
            described["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        return described
