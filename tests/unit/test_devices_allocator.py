"""The allocator's own count of a region (``memprop.devices.allocator``) against bytes counted by
hand: the mechanism that checks the ledger must itself be right."""

from __future__ import annotations

import pytest
import torch

from memprop.devices.allocator import CUDA_BLOCK_BYTES, AllocatorMeter, _count, live_bytes
from memprop.errors import UsageError


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _region(device: str, sizes: tuple[int, int, int]) -> tuple[AllocatorMeter, int, int, int]:
    """A region over one storage live at entry (named twice: it and a view of it) that makes
    three tensors of known sizes, frees the first before the third, and keeps the third. Returns
    the meter and, counted by hand, the entry bytes, the peak and the bytes live at the end."""
    first, second, third = sizes
    weights = torch.ones(first, device=device)
    meter = AllocatorMeter(device, [weights, weights[1:], None])
    with meter:
        a = torch.ones(first, device=device)
        b = torch.ones(second, dtype=torch.float64, device=device)
        entry, a_bytes, b_bytes = _bytes(weights), _bytes(a), _bytes(b)
        del a
        c = torch.ones(third, device=device)
        c_bytes = _bytes(c)
        del b
    peak = entry + max(a_bytes + b_bytes, b_bytes + c_bytes)
    return meter, entry, peak, entry + c_bytes


def test_the_peak_of_a_region_is_counted_to_the_byte() -> None:
    # 1000 float32, 2000 float64, 3000 float32: the peak is b and c live together with the
    # weights, 4000 + 16000 + 12000 bytes, not a, b and c (a is freed first).
    meter, entry, peak, end = _region("cpu", (1000, 2000, 3000))
    result = meter.result
    assert result is not None
    assert result.entry_bytes == entry  # the view of the weights is not counted again
    assert result.peak_bytes == peak
    assert result.end_bytes == end
    assert result.unreported_frees == 0


def test_a_free_of_a_storage_live_at_entry_lowers_the_count() -> None:
    # A storage the first region made (c10 knows its size from then) is named live at entry of
    # the second and freed inside it, before a smaller one is made: the peak is the entry.
    kept = {}
    with AllocatorMeter("cpu"):
        kept["x"] = torch.ones(4096)
    x_bytes = _bytes(kept["x"])
    meter = AllocatorMeter("cpu", [kept["x"]])
    with meter:
        del kept["x"]
        y = torch.ones(1024)
    assert meter.result is not None
    assert meter.result.peak_bytes == x_bytes
    assert meter.result.end_bytes == _bytes(y)


def test_an_address_handed_out_again_proves_the_old_block_freed() -> None:
    # Synthetic events (time, order, address, bytes): the storage at 0x10, live at entry, is
    # freed without a report (allocated before any profiling), then its address is reused.
    entry = {0x10: 400, 0x20: 100}
    events = [(1, 0, 0x30, 50), (2, 1, 0x10, 300), (3, 2, 0x30, -50)]
    result = _count(events, entry, 0.0)
    assert result.peak_bytes == 500 + 50  # before the reuse: entry and the 50-byte block
    assert result.unreported_frees == 1
    assert result.end_bytes == 100 + 300
    # A free of a block nobody named and the region did not make is not counted at all.
    assert _count([(1, 0, 0x99, -64)], {}, 0.0).peak_bytes == 0


def test_glibc_sees_what_the_allocator_counts() -> None:
    # A third opinion, from malloc itself: what a region leaves allocated, by the allocator's
    # count, is what glibc has handed out more at its end (the interpreter's own churn aside).
    from memprop.devices.cpu import malloc_in_use_bytes

    if malloc_in_use_bytes() is None:
        pytest.skip("no glibc >= 2.33 (mallinfo2)")
    kept = []
    meter = AllocatorMeter("cpu")
    before = malloc_in_use_bytes()
    with meter:
        kept += [torch.ones(2**20), torch.ones(3, 2**20, dtype=torch.float64)]
        scratch = torch.ones(2**22)
        del scratch
    after = malloc_in_use_bytes()
    assert meter.result is not None and before is not None and after is not None
    net = meter.result.end_bytes - meter.result.entry_bytes
    assert net == sum(_bytes(t) for t in kept)
    assert abs((after - before) - net) <= 0.01 * net, (after - before, net)


def test_live_bytes_counts_each_storage_once_and_only_on_its_device() -> None:
    base = torch.ones(64, 64)
    other = torch.ones(10, dtype=torch.float64)
    storages = live_bytes([base, base.t(), base[3], other, None], "cpu")
    assert storages == {base.data_ptr(): _bytes(base), other.data_ptr(): _bytes(other)}
    assert live_bytes([base], "cuda") == {}


def test_a_profiler_already_running_is_refused_with_a_reason() -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]), pytest.raises(UsageError,
                                                                   match="already running"):
        AllocatorMeter("cpu").__enter__()


@pytest.mark.cuda
def test_the_peak_of_a_region_on_a_gpu_is_counted_to_the_byte() -> None:
    # Sizes in whole 512-byte blocks, so the caching allocator rounds nothing.
    sizes = (CUDA_BLOCK_BYTES, 4 * CUDA_BLOCK_BYTES // 8, 3 * CUDA_BLOCK_BYTES)
    meter, entry, peak, end = _region("cuda", sizes)
    assert meter.result is not None
    assert meter.result.entry_bytes == entry
    assert meter.result.peak_bytes == peak
    assert meter.result.end_bytes == end
