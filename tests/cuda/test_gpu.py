"""On a GPU: the ledger against the caching allocator, planned runs against their budget, NVML
against CUDA, and the layers of a profile. Skipped without one (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import memprop
from memprop.bench.gpu import outside_bytes, warm_up
from memprop.budget import resolve_budget
from memprop.devices import get_device, gpu_layers
from memprop.devices.cuda import CudaDevice, nvml_status
from memprop.run.measure import run_plan
from memprop.workload import SeedConfig, seed_workload
from memprop_cli.main import app

pytestmark = pytest.mark.cuda

LEDGER_TOLERANCE = 0.02

CASES = [
    SeedConfig(input_dim=1024, hidden=1024, classes=10, depth=4, batch=256, device="cuda:0"),
    SeedConfig(input_dim=2048, hidden=2048, classes=10, depth=8, batch=1024, device="cuda:0"),
    SeedConfig(input_dim=784, hidden=512, classes=10, depth=8, batch=512, device="cuda:0",
               optimizer="adam"),
]


@pytest.mark.parametrize("config", CASES, ids=lambda c: f"w{c.hidden}-d{c.depth}-b{c.batch}")
def test_ledger_matches_max_memory_allocated(config: SeedConfig) -> None:
    workload = seed_workload(config)
    warm_up(workload)
    profile = memprop.profile(workload)
    assert profile.measured is not None
    measured = profile.measured.training_peak_bytes
    error = abs(profile.training_peak_bytes - measured) / measured
    assert error <= LEDGER_TOLERANCE, (profile.training_peak_bytes, measured)


def test_planned_run_stays_within_its_budget() -> None:
    config = SeedConfig(input_dim=2048, hidden=2048, classes=10, depth=8, batch=2048,
                        device="cuda:0")
    workload = seed_workload(config)
    warm_up(workload)
    profile = memprop.profile(workload)
    budget = profile.training_peak_bytes - profile.saved_activations_bytes // 2
    plan = memprop.plan(workload, budget=budget)
    assert plan.feasible and plan.peak_bytes <= budget
    workload.model.zero_grad(set_to_none=True)
    outside = outside_bytes(workload, torch.device("cuda:0"))
    run = run_plan(workload, plan, steps=2)
    # The allocator's figure counts the step's state and max_memory_allocated's rise over the
    # step: the process's other tensors (cuBLAS's workspaces, ``outside``) are not in it.
    assert run.allocator_peak_bytes <= budget, (run.allocator_peak_bytes, outside, budget)
    assert abs(run.peak_bytes - run.allocator_peak_bytes) <= LEDGER_TOLERANCE * budget
    assert run.peak_bytes < run.baseline_peak_bytes
    assert run.gradients_match and run.buffers_match


def test_nvml_agrees_with_cuda() -> None:
    assert nvml_status() == "ok", nvml_status()
    device = CudaDevice("cuda:0")
    torch.empty(1, device="cuda:0")
    memory = device.nvml_memory()
    free, total = torch.cuda.mem_get_info(0)
    assert memory is not None
    assert abs(memory.total_bytes - total) <= 0.02 * total
    assert abs(memory.free_bytes - free) <= 0.03 * total
    assert memory.used_bytes + memory.free_bytes <= memory.total_bytes
    if memory.process_bytes is not None:
        assert memory.process_bytes >= device.reserved_bytes()
    context = device.context_bytes()
    assert 0 <= context < 4 * 1024**3
    assert device.context_bytes() == context  # measured once
    described = device.describe()
    assert described["driver"] and described["name"] == torch.cuda.get_device_name(0)


def test_budgets_from_the_device() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    assert resolve_budget("90%", "cuda:0").bytes == int(total * 0.9)
    default = resolve_budget(None, "cuda:0")
    free, _ = torch.cuda.mem_get_info(0)
    assert 0 < default.bytes <= free + torch.cuda.memory_reserved(0)


def test_profile_has_the_gpu_layers_in_order() -> None:
    workload = seed_workload(CASES[0])
    warm_up(workload)
    profile = memprop.profile(workload)
    layers = profile.gpu_layers or gpu_layers(get_device("cuda:0"), profile.training_peak_bytes)
    assert layers is not None
    names = [layer.name.split(" (")[0] for layer in layers]
    assert names[:3] == ["tensor bytes", "tensors allocated", "allocator reserved"]
    assert names[-1] == "device used"
    assert set(names[3:-1]) <= {"process used"}
    sizes = [layer.bytes for layer in layers]
    assert sizes[0] <= sizes[1] * (1 + LEDGER_TOLERANCE)
    assert sizes[1:] == sorted(sizes[1:])
    if profile.gpu_layers is not None:
        assert [layer["name"] for layer in profile.to_dict()["gpu_layers"]] == \
            [layer.name for layer in layers]


def test_profile_command_prints_the_layers() -> None:
    result = CliRunner().invoke(app, ["profile", "--device", "cuda:0", "--hidden", "256",
                                      "--depth", "2", "--batch", "64"])
    assert result.exit_code == 0, result.output
    assert "GPU memory, layer by layer" in result.stdout
    assert "allocator reserved" in result.stdout


def test_a_gpu_that_is_not_there() -> None:
    result = CliRunner().invoke(app, ["profile", "--device",
                                      f"cuda:{torch.cuda.device_count()}"])
    assert result.exit_code == 2 and "pick one of those" in result.stderr
