"""Sweeps and fits against oracles: real runs (to the byte), the seed's closed form, and exact
arithmetic for the fitted lines."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from memprop.blame import is_out_of_memory
from memprop.closed_form import SeedShape, closed_form
from memprop.errors import BudgetInfeasibleError, UsageError, WorkloadError
from memprop.estimate import fit, fit_line, seed_builder, sweep
from memprop.estimate.sweep import trace_fake
from memprop.workload import SeedConfig, Workload

SMALL = SeedConfig(input_dim=16, hidden=32, classes=4)


def _closed_training_peak(batch: int, depth: int) -> int:
    shape = SeedShape(input_dim=16, hidden=32, classes=4, depth=depth, batch=batch)
    return closed_form(shape)["training_peak_bytes"]


def test_fake_cells_equal_real_cells_to_the_byte() -> None:
    grid = {"batch_sizes": (1, 5, 64), "depths": (1, 3)}
    fake = sweep(seed_builder(SMALL), **grid)
    real = sweep(seed_builder(SMALL), **grid, real=True)
    assert fake.mode == "fake" and real.mode == "real"
    assert [c.status for c in real.cells] == ["ok"] * 6
    for f, r in zip(fake.cells, real.cells, strict=True):
        assert (f.batch_size, f.depth) == (r.batch_size, r.depth)
        assert f.training_peak_bytes == r.training_peak_bytes == r.predicted_training_peak_bytes
        assert f.inference_peak_bytes == r.inference_peak_bytes
        assert f.saved_activations_bytes == r.saved_activations_bytes


def test_every_cell_equals_the_closed_form() -> None:
    result = sweep(seed_builder(SMALL), batch_sizes=(1, 7, 300), depths=(1, 2, 5))
    for cell in result.cells:
        assert cell.depth is not None
        expected = _closed_training_peak(cell.batch_size, cell.depth)
        assert cell.training_peak_bytes == cell.closed_form_training_peak_bytes == expected
        # a float32 MLP saves s·b·h per layer, s·b·q for log-softmax and one scalar
        assert cell.saved_activations_bytes == 4 * cell.batch_size * (32 * cell.depth + 4) + 4
        assert cell.ratio == cell.training_peak_bytes / cell.inference_peak_bytes


def test_training_peak_is_affine_in_batch_while_its_moment_holds() -> None:
    # NOTE [ Affine in batch ]: the same peak tick means the same live storages, each affine in
    # the batch, so the cells of one depth and one peak tick lie exactly on a line.
    batches = (1, 2, 3, 8, 64, 128, 1024, 2048, 4096)
    result = sweep(seed_builder(SMALL), batch_sizes=batches, depths=(1, 4))
    groups: dict[tuple[int | None, int | None], list[tuple[int, int]]] = {}
    for cell in result.cells:
        assert cell.training_peak_bytes is not None
        groups.setdefault((cell.depth, cell.peak_tick), []).append(
            (cell.batch_size, cell.training_peak_bytes))
    lines = 0
    for points in groups.values():
        line = fit_line([b for b, _ in points], [p for _, p in points])
        if line is not None:
            lines += 1
            assert line.max_residual_bytes == 0.0
    assert lines >= 2
    for depth_fit in result.line_fits():
        # across the change of moment the traced cells and the closed form agree on the
        # residual too, and the large-batch slope is the closed form's
        assert depth_fit.training is not None and depth_fit.closed_form_training is not None
        assert depth_fit.training == depth_fit.closed_form_training


def test_large_batches_lie_on_one_line_with_the_closed_form_slope() -> None:
    batches = (1024, 2048, 3000, 4096)
    result = sweep(seed_builder(SMALL), batch_sizes=batches, depths=(1, 4))
    for depth_fit in result.line_fits():
        assert depth_fit.depth is not None and depth_fit.training is not None
        assert depth_fit.training.max_residual_bytes == 0.0
        slope = _closed_training_peak(4097, depth_fit.depth) - _closed_training_peak(
            4096, depth_fit.depth)
        assert depth_fit.training.per_example_bytes == slope
        assert depth_fit.training.predict(4096) == _closed_training_peak(4096, depth_fit.depth)


def test_fit_line_is_exact_least_squares() -> None:
    line = fit_line([1, 64, 4096], [7 + 3 * 1, 7 + 3 * 64, 7 + 3 * 4096])
    assert line is not None
    assert (line.fixed_bytes, line.per_example_bytes, line.max_residual_bytes) == (7.0, 3.0, 0.0)
    # (0, 0), (1, 1), (2, 0): slope 0, intercept 1/3, residuals 1/3, 2/3, 1/3
    bent = fit_line([0, 1, 2], [0, 1, 0])
    assert bent is not None
    assert bent.per_example_bytes == 0.0
    assert bent.fixed_bytes == float(Fraction(1, 3))
    assert bent.max_residual_bytes == float(Fraction(2, 3))
    assert fit_line([5, 5], [1, 2]) is None


def test_real_sweep_skips_cells_predicted_not_to_fit() -> None:
    limit = _closed_training_peak(64, 1)
    result = sweep(seed_builder(SMALL), batch_sizes=(1, 64, 65, 4096), depths=(1,), real=True,
                   available_bytes=limit)
    assert [c.status for c in result.cells] == ["ok", "ok", "oom", "oom"]
    skipped = result.cell(4096, 1)
    assert skipped.training_peak_bytes is None
    assert skipped.predicted_training_peak_bytes == _closed_training_peak(4096, 1)
    assert skipped.message is not None and "traced on fake tensors" in skipped.message


class _RunsOutOfMemory(nn.Module):
    """Raises CUDA's out-of-memory error on real inputs above a batch size."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2 and not isinstance(x, FakeTensor):
            raise self.error
        return self.linear(x)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate... out of memory"),
])
def test_real_sweep_records_a_cell_that_runs_out_of_memory_and_goes_on(error: Exception) -> None:
    def build(batch_size: int, depth: int | None) -> Workload:
        return Workload(model=_RunsOutOfMemory(error), inputs=(torch.randn(batch_size, 4),),
                        name="oom", batch_size=batch_size)

    result = sweep(build, batch_sizes=(1, 2, 3), real=True)
    assert [c.status for c in result.cells] == ["ok", "ok", "oom"]
    message = result.cells[2].message
    assert message is not None and message.startswith("ran out of memory:")
    assert is_out_of_memory(error)
    assert not is_out_of_memory(RuntimeError("shapes cannot be multiplied"))


def test_a_failing_cell_is_an_error_with_its_message() -> None:
    def build(batch_size: int, depth: int | None) -> Workload:
        if batch_size == 3:
            raise ValueError("batch 3 is odd")
        return Workload(model=nn.Linear(4, 2), inputs=(torch.randn(batch_size, 4),),
                        name="picky", batch_size=batch_size)

    result = sweep(build, batch_sizes=(2, 3, 4))
    assert [c.status for c in result.cells] == ["ok", "error", "ok"]
    message = result.cells[1].message or ""
    # The user's code is named, frame and line, as everywhere it runs (memprop.blame).
    assert message.startswith("fake trace: building batch 3 raised ValueError: batch 3 is odd "
                              "(at ")
    assert "test_sweep.py:" in message and 'raise ValueError("batch 3 is odd")' in message
    document = result.to_dict()
    assert document["schema_version"] == 1
    assert [c["status"] for c in document["cells"]] == ["ok", "error", "ok"]
    assert document["workload"]["mode"] == "fake" and document["workload"]["name"] == "picky"


def test_a_bug_of_memprop_in_a_cell_is_raised_not_recorded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Error map, sweep cells: only the user's errors are a cell's; memprop's own keep their
    traceback (exit 1), instead of hiding as an "error" cell."""
    import importlib

    sweep_module = importlib.import_module("memprop.estimate.sweep")  # not the function
    def broken_profile(workload: Workload) -> None:
        raise AssertionError("the ledger lost a storage")

    monkeypatch.setattr(sweep_module, "profile", broken_profile)

    def build(batch_size: int, depth: int | None) -> Workload:
        return Workload(model=nn.Linear(4, 2), inputs=(torch.randn(batch_size, 4),))

    with pytest.raises(AssertionError, match="the ledger lost a storage"):
        sweep(build, batch_sizes=(2,))


def test_a_usage_error_ends_the_sweep() -> None:
    def build(batch_size: int, depth: int | None) -> Workload:
        raise UsageError("--depth was given but f takes no 'depth' argument")

    with pytest.raises(UsageError, match="depth"):
        sweep(build, batch_sizes=(1, 2), depths=(1, 2))
    with pytest.raises(UsageError):
        sweep(seed_builder(SMALL), batch_sizes=(0, 2))


def test_fit_finds_the_largest_batch_by_the_closed_form() -> None:
    budget = _closed_training_peak(1000, 2) + 100
    result = fit(seed_builder(SMALL), budget_bytes=budget, depth=2)
    batch = result.max_batch_size
    assert _closed_training_peak(batch, 2) <= budget < _closed_training_peak(batch + 1, 2)
    assert result.training_peak_bytes == _closed_training_peak(batch, 2)
    assert result.next_training_peak_bytes == _closed_training_peak(batch + 1, 2)
    assert result.headroom_bytes == budget - result.training_peak_bytes
    assert [p.batch_size for p in result.probes][:3] == [1, 2, 4]
    # once memprop.plan is a function, the planner may only raise the batch
    checkpointed = result.max_batch_size_with_checkpointing
    assert checkpointed is None or checkpointed >= batch
    document = result.to_dict()
    assert document["schema_version"] == 1 and document["max_batch_size"] == batch
    assert document["max_batch_size_with_checkpointing"] == checkpointed
    assert ("not computed" in document["checkpointing_note"]) == (checkpointed is None)


def test_fit_real_batch_fits_and_one_more_does_not() -> None:
    budget = _closed_training_peak(300, 1) + 5000
    result = fit(seed_builder(SMALL), budget_bytes=budget, depth=1, real=True)
    verification = result.verification
    assert verification is not None and verification.fits
    assert verification.batch_size == result.max_batch_size
    assert verification.training_peak_bytes == verification.predicted_training_peak_bytes
    one_more = trace_fake(seed_builder(SMALL), result.max_batch_size + 1, 1)
    assert one_more.training_peak_bytes > budget


def test_fit_batch_one_over_budget_says_the_smallest_budget() -> None:
    smallest = _closed_training_peak(1, 3)
    with pytest.raises(BudgetInfeasibleError) as raised:
        fit(seed_builder(SMALL), budget_bytes=smallest - 1, depth=3)
    assert raised.value.min_feasible_bytes == smallest
    assert f"{smallest:,}" in str(raised.value)  # the least peak in bytes, said once
    assert fit(seed_builder(SMALL), budget_bytes=smallest, depth=3).max_batch_size == 1


def test_fit_refuses_a_peak_that_does_not_grow_with_the_batch() -> None:
    def build(batch_size: int, depth: int | None) -> Workload:
        return Workload(model=nn.Linear(4, 2), inputs=(torch.randn(2, 4),), name="fixed")

    with pytest.raises(WorkloadError, match="does not grow"):
        fit(build, budget_bytes=1 << 30)
