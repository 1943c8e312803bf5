"""The reconciliation's arithmetic and its table, and what the CLI says without a GPU."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from memprop.bench.gpu import gpu_report
from memprop.devices.reconcile import reconcile
from memprop.report.terminal_gpu import render_reconciliation
from memprop_cli.main import app

MIB = 1024**2
GIB = 1024**3


def test_the_ledger_and_the_allocator_as_two_layers() -> None:
    layers = reconcile(tensor_bytes=900 * MIB, allocated_bytes=932 * MIB,
                       reserved_bytes=1024 * MIB, process_bytes=1536 * MIB,
                       device_used_bytes=2048 * MIB, device_total_bytes=80 * GIB)
    assert [layer.bytes for layer in layers] == [900 * MIB, 932 * MIB, 1024 * MIB, 1536 * MIB,
                                                 2048 * MIB]
    assert [layer.gap_bytes for layer in layers] == [0, 32 * MIB, 92 * MIB, 512 * MIB, 512 * MIB]
    assert "cuBLAS workspaces" in layers[1].explanation
    assert "1.10x the tensors" in layers[2].explanation  # against the allocator's tensors
    assert all(layer.advice is None for layer in layers)
    assert layers[4].explanation.startswith("+512 MiB: other processes")


def test_a_negative_gap_keeps_its_sign() -> None:
    layers = reconcile(tensor_bytes=1024, allocated_bytes=512, reserved_bytes=2 * MIB,
                       process_bytes=None, device_used_bytes=None, device_total_bytes=None)
    assert layers[1].gap_bytes == -512 and layers[1].explanation.startswith("-512 B:")


def test_without_a_per_process_figure_the_context_sits_with_the_others() -> None:
    layers = reconcile(tensor_bytes=GIB, reserved_bytes=GIB, process_bytes=None,
                       device_used_bytes=GIB + 600 * MIB, device_total_bytes=80 * GIB)
    assert [layer.name for layer in layers][-1] == "device used (NVML)"
    assert layers[-1].gap_bytes == 600 * MIB and "CUDA context" in layers[-1].explanation
    assert layers[-1].advice is None  # 600 MiB is a context, not another process


def test_the_table_shows_every_layer_and_the_advice() -> None:
    layers = reconcile(tensor_bytes=10 * GIB, reserved_bytes=14 * GIB, process_bytes=15 * GIB,
                       device_used_bytes=18 * GIB, device_total_bytes=80 * GIB)
    console = Console(width=140, file=io.StringIO(), color_system=None)
    render_reconciliation(layers, console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for words in ("GPU memory, layer by layer", "tensor bytes", "allocator reserved",
                  "process used (NVML)", "device used (NVML)", "10.00 GiB", "+4.00 GiB",
                  "+3.00 GiB", "advice: the reserve is 1.40x",
                  "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
                  "advice: another process holds over 1 GiB"):
        assert words in text, words


def test_no_layers_print_nothing() -> None:
    console = Console(width=100, file=io.StringIO(), color_system=None)
    render_reconciliation([], console)
    assert console.file.getvalue() == ""  # type: ignore[attr-defined]


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_profile_on_cuda_without_a_gpu_exits_2_with_one_line(no_gpu: None) -> None:
    result = CliRunner().invoke(app, ["profile", "--device", "cuda"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "device cpu" in lines[0]
    assert "Traceback" not in result.output


def test_bench_gpu_without_a_gpu_is_skipped(tmp_path: Path, no_gpu: None) -> None:
    assert gpu_report() is None
    result = CliRunner().invoke(app, ["bench", "--only", "gpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "gpu: skipped, no CUDA device" in result.stdout
    assert list(tmp_path.iterdir()) == []
