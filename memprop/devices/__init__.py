"""Memory backends: the only place that reads /proc or talks to NVML."""

from __future__ import annotations

import torch

from memprop.devices.base import MemoryDevice
from memprop.devices.cpu import CpuDevice
from memprop.devices.reconcile import Layer
from memprop.errors import UsageError

__all__ = ["MemoryDevice", "get_device", "gpu_layers"]


def get_device(name: str | torch.device) -> MemoryDevice:
    """The backend for ``cpu``, ``cuda`` or ``cuda:N``; a clear error for anything else."""
    text = str(name)
    if text == "cpu":
        return CpuDevice()
    if text == "cuda" or text.startswith("cuda:"):
        from memprop.devices.cuda import CudaDevice

        return CudaDevice(text)
    if text == "meta":
        return CpuDevice()
    raise UsageError(f"device {text!r} is not supported: use cpu, cuda or cuda:N")


def gpu_layers(backend: object, tensor_bytes: int) -> tuple[Layer, ...] | None:
    """On a GPU backend, the reconciliation of the step since its last ``reset_peak`` against
    the ledger's ``tensor_bytes``; None for any other backend (or none)."""
    from memprop.devices.cuda import CudaDevice

    if not isinstance(backend, CudaDevice):
        return None
    return tuple(backend.layers(tensor_bytes))
