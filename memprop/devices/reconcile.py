"""Three numbers people confuse on a GPU, side by side, each gap explained.

1. **Tensor bytes**: live tensor storages (the ledger; ``torch.cuda.max_memory_allocated``).
   When the ledger's peak is given beside the allocator's, the gap between them is tensors this
   process holds outside the traced step (cuBLAS workspaces, tensors made earlier).
2. **Allocator reserved**: what PyTorch's caching allocator holds from CUDA: the tensors plus
   cached free blocks and fragmentation (``torch.cuda.max_memory_reserved``).
3. **Process used (NVML)**: what ``nvidia-smi`` shows for this process: the reserve plus the CUDA
   context, cuBLAS/cuDNN workspaces and other libraries' own allocations.
4. **Device used (NVML)**: the whole GPU: this process plus every other process.

The budget memprop plans for is a cap on (1); the device runs out at (4). This module is pure
arithmetic on the four figures, so it is tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from memprop.units import format_bytes

__all__ = ["Layer", "reconcile"]

# Above this reserved/allocated ratio the cache is mostly holes: expandable segments let the
# allocator grow one mapping instead of keeping many fixed-size blocks.
FRAGMENTATION_RATIO = 1.3


@dataclass(frozen=True, kw_only=True, slots=True)
class Layer:
    name: str
    bytes: int
    gap_bytes: int
    """This layer less the one before it (0 for the first)."""
    explanation: str
    advice: str | None = None


def _signed(n: int) -> str:
    return ("+" if n >= 0 else "") + format_bytes(n)


def reconcile(
    *,
    tensor_bytes: int,
    reserved_bytes: int,
    process_bytes: int | None,
    device_used_bytes: int | None,
    device_total_bytes: int | None,
    allocated_bytes: int | None = None,
) -> list[Layer]:
    """The layers from tensors to the whole device, with a sentence for each gap.

    ``tensor_bytes`` is the ledger's training peak; ``allocated_bytes``, when given, the
    allocator's (``max_memory_allocated``), shown as a layer of its own."""
    if allocated_bytes is None:
        layers = [
            Layer(name="tensor bytes (ledger, max_memory_allocated)", bytes=tensor_bytes,
                  gap_bytes=0, explanation="live tensor storages at the peak, each counted once"),
        ]
    else:
        outside = allocated_bytes - tensor_bytes
        layers = [
            Layer(name="tensor bytes (ledger)", bytes=tensor_bytes, gap_bytes=0,
                  explanation="live storages of the traced step at its peak, each counted once"),
            Layer(name="tensors allocated (max_memory_allocated)", bytes=allocated_bytes,
                  gap_bytes=outside,
                  explanation=f"{_signed(outside)}: tensors this process holds outside the "
                              "traced step (cuBLAS workspaces, tensors made earlier)"),
        ]
        tensor_bytes = allocated_bytes
    ratio = reserved_bytes / tensor_bytes if tensor_bytes else 1.0
    cache_gap = reserved_bytes - tensor_bytes
    advice = None
    if ratio > FRAGMENTATION_RATIO:
        advice = (f"the reserve is {ratio:.2f}x the tensors: set PYTORCH_CUDA_ALLOC_CONF="
                  "expandable_segments:True to cut fragmentation")
    layers.append(Layer(
        name="allocator reserved (max_memory_reserved)", bytes=reserved_bytes,
        gap_bytes=cache_gap,
        explanation=f"{_signed(cache_gap)}: blocks the caching allocator keeps for reuse "
                    f"and the holes between them ({ratio:.2f}x the tensors)",
        advice=advice,
    ))
    if process_bytes is not None and process_bytes > 0:
        context_gap = process_bytes - reserved_bytes
        layers.append(Layer(
            name="process used (NVML)", bytes=process_bytes, gap_bytes=context_gap,
            explanation=f"{_signed(context_gap)}: the CUDA context, its kernels and the "
                        "library handles (cuBLAS, cuDNN) loaded for this process",
            advice=None if context_gap < 2 * 1024**3 else
            "a context over 2 GiB: lazy module loading (CUDA_MODULE_LOADING=LAZY) helps",
        ))
    if device_used_bytes is not None:
        total = (f", of {format_bytes(device_total_bytes)} on the device"
                 if device_total_bytes else "")
        if process_bytes:
            others = device_used_bytes - process_bytes
            explanation = f"{_signed(others)}: other processes and the driver{total}"
            advice = None if others < 1024**3 else "another process holds over 1 GiB of this GPU"
        else:
            others = device_used_bytes - reserved_bytes
            explanation = (f"{_signed(others)}: this process's CUDA context (NVML gave no "
                           f"per-process figure), other processes and the driver{total}")
            advice = None if others < 4 * 1024**3 else (
                "over 4 GiB beyond this process's reserve: other processes probably hold part "
                "of this GPU (nvidia-smi lists them)")
        layers.append(Layer(
            name="device used (NVML)", bytes=device_used_bytes, gap_bytes=others,
            explanation=explanation, advice=advice,
        ))
    return layers
