"""``memprop run`` holds the allocator's peak to the budget where kernels allocate scratch inside
one op, which the ledger cannot see (NOTE [ Scratch the ledger cannot see ] in
``memprop.run.scratch``): oneDNN's convolution backward on the CPU."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import memprop
from memprop.errors import BudgetInfeasibleError
from memprop.run.measure import run_plan
from memprop.workload import to_workload
from memprop_cli.main import app

MODELS = '''
import torch
from torch import nn


class ConvBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


class PatchConvNet(nn.Module):
    """A torchvision-style patch embedding (a 4x4 convolution of stride 4), then residual 3x3
    convolutions: each one's backward allocates oneDNN scratch on a CPU."""

    def __init__(self, channels=16, depth=4):
        super().__init__()
        self.embed = nn.Conv2d(3, channels, 4, 4)
        self.blocks = nn.Sequential(*(ConvBlock(channels) for _ in range(depth)))
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean((2, 3)))


def patch_conv_net(batch_size=8):
    torch.manual_seed(0)
    return PatchConvNet(), torch.randn(batch_size, 3, 64, 64)
'''

MODEL = "scratch_models.py:patch_conv_net"


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "scratch_models.py").write_text(textwrap.dedent(MODELS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _user_models() -> Any:
    """The fixture's file, loaded afresh (another test's ``models`` may be imported)."""
    spec = importlib.util.spec_from_file_location("scratch_models", "scratch_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tight_budget() -> tuple[int, int]:
    """(a budget that a plan for the whole budget breaks by the allocator's count, the gap):
    the least feasible peak plus the allocator's count above the ledger on the unplanned step
    (measured here by run_plan's two mechanisms, apart from the scratch probe), plus 1 KiB."""
    workload = to_workload(*_user_models().patch_conv_net())
    with pytest.raises(BudgetInfeasibleError) as infeasible:
        memprop.plan(workload, budget=1, fake=True)
    unplanned = run_plan(workload, memprop.plan(workload, budget="1TiB", fake=True), steps=1,
                         baseline=False)
    gap = unplanned.allocator_peak_bytes - unplanned.peak_bytes
    assert gap > 0, "no scratch on this machine: the test cannot show anything"
    return infeasible.value.min_feasible_bytes + gap + 1024, gap


def test_a_planned_run_holds_the_allocators_peak_to_the_budget_with_kernels_scratch(
        models: Path) -> None:
    """Oracle: the allocator's count (c10's CPU allocator, independent of the ledger the plan
    is made from) at every measured step, the third (the steady state) included, within the
    budget. Failed before: a plan made for the whole budget peaked above it by the scratch."""
    budget, gap = _tight_budget()
    result = CliRunner().invoke(app, ["run", "--model", MODEL, "--budget", str(budget),
                                      "--steps", "1", "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    steps = document["measured"]["allocator_step_peaks_bytes"]
    assert len(steps) == 3 and max(steps) <= budget, (steps, budget)
    assert document["budget_bytes"] == budget
    scratch = document["measured"]["scratch_bytes"]
    assert scratch >= gap  # the largest of any op, at least what the unplanned peak showed
    said = " ".join(result.stderr.split())
    assert "kernels' scratch the ledger cannot see:" in said
    assert document["measured"]["scratch_op"] in said


def test_a_run_measured_over_its_budget_is_one_line_that_exits_3(
        models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Oracle: README's exit-code table (3: it does not fit) and the allocator's figures. The
    scratch probe forced to see nothing (as a plan made on fake tensors alone), the plan for the
    whole budget is broken by the scratch: the user's outcome, said in one line with by how much
    and why, not "a memprop bug" (exit 1 before)."""
    from memprop.run import scratch

    budget, _ = _tight_budget()
    monkeypatch.setattr(scratch, "measure_scratch",
                        lambda *_a, **_k: scratch.Scratch(bytes=0, op="", ops=0))
    result = CliRunner().invoke(app, ["run", "--model", MODEL, "--budget", str(budget),
                                      "--steps", "1"])
    assert result.exit_code == 3, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("memprop: error:")]
    assert len(errors) == 1
    line = errors[0]
    assert "over the budget" in line and "kernels' scratch" in line
    assert "bug" not in line


def test_a_measured_checkpoint_holds_the_allocators_peak_at_step_3_to_the_budget(
        models: Path) -> None:
    """Oracle: the allocator's count (memprop.devices.allocator, independent of the ledger)
    of the third step of the user's own loop (zero_grad, forward, loss, backward, SGD step)
    through ``memprop.checkpoint(..., cost_model="measured")``, within the budget. Failed
    before: the plan was made for the whole budget, which the scratch broke."""
    import torch

    from memprop.devices.allocator import AllocatorMeter

    budget, _ = _tight_budget()
    model, inputs = _user_models().patch_conv_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    wrapped = memprop.checkpoint(model, inputs, budget, cost_model="measured",
                                 optimizer=optimizer)
    assert wrapped.scratch is not None and wrapped.scratch.bytes > 0
    assert any("kernels' scratch the ledger cannot see" in note for note in wrapped.notes)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        state = [*model.parameters(), *model.buffers(), inputs]
        with AllocatorMeter("cpu", state) as meter:
            wrapped(inputs).float().mean().backward()
            optimizer.step()
    assert meter.result is not None and meter.result.peak_bytes <= budget, (
        meter.result, budget)
    fake_planned = memprop.checkpoint(model, inputs, budget)
    assert fake_planned.scratch is None
    assert any("excludes kernels' scratch" in note for note in fake_planned.notes)


def test_compiled_steps_measured_over_their_budget_are_one_line_that_exits_3(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Oracle: README's exit-code table (3: it does not fit). The compiled steps' measurement
    replaced by one 1 KiB over the budget (as inductor's in-kernel scratch would make it): the
    user's outcome in one line with by how much, not "a memprop bug" (exit 1 before)."""
    from memprop.run import compiled
    from memprop.units import format_bytes

    def over(workload: Any, plan: Any, steps: int = 5) -> compiled.CompiledRunResult:
        peaks = (plan.budget_bytes + 1024,) * 3
        return compiled.CompiledRunResult(
            plan=plan, steps=steps, allocator_step_peaks_bytes=peaks,
            baseline_allocator_step_peaks_bytes=peaks, allocator_source="the test",
            step_s=1.0, baseline_step_s=1.0, gradients_match=True)

    monkeypatch.setattr(compiled, "run_compiled", over)
    model = f"{Path(__file__).parent.parent / 'unit' / 'test_compiled_plan.py'}:residual_mlp"
    result = CliRunner().invoke(app, ["run", "--model", model, "--batch", "128", "--budget",
                                      "1GiB", "--compile", "--steps", "1"])
    assert result.exit_code == 3, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("memprop: error:")]
    assert len(errors) == 1 and f"{format_bytes(1024)} over the budget" in errors[0]
    assert "bug" not in errors[0]


def test_the_least_budget_a_refusal_names_runs_within_it_whichever_side_of_the_plan_refused(
        models: Path) -> None:
    """Oracle: following the advice. A budget below the least feasible peak (refused by the plan
    on fake tensors) and one above it that only the scratch makes too small (refused after the
    scratch is measured) name the same least budget, and a run at that budget passes with the
    allocator's count at every measured step within it. Failed before: the first refusal named
    the least peak without the scratch, a budget that was then refused again."""
    import re

    budget, gap = _tight_budget()
    least_peak = budget - gap - 1024
    named = []
    for below in (least_peak - 1, least_peak + gap // 2):
        result = CliRunner().invoke(app, ["run", "--model", MODEL, "--budget", str(below),
                                          "--steps", "1"])
        assert result.exit_code == 3, result.output
        found = re.search(r"at least (\S+?)[ ,]", result.stderr)
        assert found is not None, result.stderr
        named.append(found.group(1))
    assert named[0] == named[1], named
    result = CliRunner().invoke(app, ["run", "--model", MODEL, "--budget", named[0],
                                      "--steps", "1", "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert max(document["measured"]["allocator_step_peaks_bytes"]) <= document["budget_bytes"]
