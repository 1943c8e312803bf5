"""A torch.compile'd step planned to a peak budget (memprop.plan.compiled) and run under it
(memprop.run.compiled, memprop.checkpoint(..., compile=True)), checked by mechanisms that share
nothing with the plan:

- each budget against the allocator's own count (memprop.devices.allocator: c10's CPU
  allocator through torch.profiler's memory events) of the loop's third step (AdamW), the
  compiled step being inductor's own code;
- the gradients against the eager, unplanned step from the same parameters (within
  COMPILED_GRADIENT_RTOL: inductor's kernels sum in another order);
- the choice: each budget is set just below the previous choice's held peak, so a plan that
  ignored the budget, or a budget that did not reach the compile, would repeat a choice.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import memprop
from memprop.devices.allocator import AllocatorMeter, step_state_tensors
from memprop.loop import training_step, zero_gradients
from memprop.plan.compiled import CompiledPlan, CompiledProbes, plan_compiled
from memprop.run.compiled import COMPILED_GRADIENT_RTOL, compiled_module
from memprop.workload import Workload, to_workload

pytestmark = pytest.mark.slow


class _Residual(nn.Sequential):
    """``x + f(x)``, ``f`` its layers in turn."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + super().forward(x)
        return out


def residual_mlp(batch_size: int = 128) -> Workload:
    """Two residual blocks (LayerNorm, Linear, GELU, Linear) and a head, with AdamW: a factory
    for ``--model`` too."""
    torch.manual_seed(0)
    net = nn.Sequential(*[_Residual(nn.LayerNorm(32), nn.Linear(32, 128), nn.GELU(),
                                    nn.Linear(128, 32)) for _ in range(2)], nn.Linear(32, 4))
    return to_workload(net, torch.randn(batch_size, 32),
                       optimizer=torch.optim.AdamW(net.parameters()))


def _measured(module: nn.Module, workload: Workload) -> tuple[int, list[torch.Tensor]]:
    """The allocator's peak of the loop's third step of ``module`` (AdamW from the workload's
    parameters), and the first step's gradients."""
    loop = Workload(model=module, inputs=tuple(workload.inputs), keywords=workload.keywords,
                    optimizer=torch.optim.AdamW(module.parameters()))
    first: list[torch.Tensor] = []
    for step in range(3):
        zero_gradients(loop)
        if step < 2:
            training_step(loop)
        else:
            with AllocatorMeter("cpu", step_state_tensors(loop)) as meter:
                training_step(loop)
        if step == 0:
            first = [p.grad.detach().clone() for p in module.parameters()
                     if p.grad is not None]
    assert meter.result is not None
    return meter.result.peak_bytes, first


def _eager_gradients(model: nn.Module, workload: Workload) -> list[torch.Tensor]:
    loop = to_workload(model, workload.inputs, optimizer=torch.optim.AdamW(model.parameters()))
    zero_gradients(loop)
    training_step(loop)
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _close(planned: list[torch.Tensor], eager: list[torch.Tensor]) -> bool:
    return len(planned) == len(eager) and all(
        (a - b).abs().max() <= COMPILED_GRADIENT_RTOL * b.abs().max()
        for a, b in zip(planned, eager, strict=True))


@pytest.fixture(scope="module")
def probes() -> CompiledProbes:
    """The candidates traced for :func:`residual_mlp` (the same workload in every test), shared:
    each costs a compile."""
    return CompiledProbes()


def test_three_peak_budgets_each_chosen_apart_and_measured_within_by_the_allocator(
        probes: CompiledProbes) -> None:
    workload = residual_mlp()
    eager = _eager_gradients(copy.deepcopy(workload.model), workload)
    plans: list[CompiledPlan] = []
    budget = plan_compiled(workload, 10**12, probes=probes).bound_peak_bytes
    for _ in range(3):
        plans.append(plan_compiled(workload, budget, probes=probes))
        budget = plans[-1].bound_peak_bytes - 1
    assert plans[0].activation_memory_budget == 1.0 and plans[0].compute_overhead == 0
    assert len({p.activation_memory_budget for p in plans}) == 3
    assert plans[1].compute_overhead > 0 and plans[2].compute_overhead > 0
    for plan in plans:
        model = copy.deepcopy(workload.model)
        if plan is plans[0]:  # the user's path: memprop.checkpoint compiles under the plan
            wrapped = memprop.checkpoint(model, workload.inputs, plan.budget_bytes,
                                         optimizer=torch.optim.AdamW(model.parameters()),
                                         compile=True)
            assert wrapped.plan.activation_memory_budget == plan.activation_memory_budget
            module: nn.Module = wrapped
        else:
            module = compiled_module(model, plan)
        peak, gradients = _measured(module, workload)
        assert peak <= plan.budget_bytes, (plan.activation_memory_budget, peak, plan)
        assert _close(gradients, eager), plan.activation_memory_budget


def test_the_budget_reaches_the_compile_even_after_another_compile_of_the_class(
        probes: CompiledProbes) -> None:
    """The saved activations of the planned step are what inductor's partitioner keeps under
    the plan's budget, read off by the allocator: a step compiled under AMB 1.0 first (the
    user's own torch.compile, same class) must not be the code the plan runs."""
    workload = residual_mlp()
    user: Any = torch.compile(copy.deepcopy(workload.model), dynamic=False)
    full, _ = _measured(user, workload)
    plan = plan_compiled(workload, full - 1, probes=probes)
    assert plan.activation_memory_budget < 1.0
    peak, _ = _measured(compiled_module(copy.deepcopy(workload.model), plan), workload)
    assert peak <= plan.budget_bytes < full


def test_an_infeasible_budget_exits_3_with_one_line() -> None:
    from memprop_cli.main import app

    result = CliRunner().invoke(app, ["plan", "--model", f"{__file__}:residual_mlp",
                                      "--batch", "128",
                                      "--budget", "1KiB", "--compile", "--fake"])
    assert result.exit_code == 3, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memprop: error: budget 1.00 KiB is below"), \
        result.output


def test_plan_compile_writes_the_plan_document_with_the_chosen_knobs(tmp_path: Any) -> None:
    """The JSON keeps the plan document's keys and adds the compiled step's."""
    import json

    from memprop_cli.main import app

    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--model", f"{__file__}:residual_mlp",
                                      "--batch", "128",
                                      "--budget", "1GiB", "--compile", "--fake", "--json",
                                      str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert set(document) >= {"budget_bytes", "strategy", "feasible", "predicted", "baseline"}
    assert document["compiled"]["activation_memory_budget"] == 1.0
    assert document["predicted"]["peak_bytes"] == document["compiled"]["bound_peak_bytes"]


def _gpt2() -> Workload:
    """A 1-layer Hugging Face GPT-2 whose logits (vocabulary 1024) outweigh its hidden states
    32 times, dropout off (inductor draws other random numbers than eager)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=4, vocab_size=1024, n_positions=64, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, 1024, (4, 16))
    return Workload(model=model, inputs=(), keywords={"input_ids": ids, "labels": ids},
                    optimizer=torch.optim.AdamW(model.parameters()), name="gpt2")


def test_the_head_option_compiled_once_lowers_the_allocators_peak_with_the_same_gradients(
        ) -> None:
    """A plan with the head in chunks: its module compiles once for every step (the option
    installed per call made dynamo recompile at each), peaks lower than the compiled step with
    the model's own head by the allocator at step 3, and its first gradients are the eager
    step's within COMPILED_GRADIENT_RTOL."""
    from torch._dynamo.utils import counters

    workload = _gpt2()
    eager_model = copy.deepcopy(workload.model)
    eager = _measured(eager_model, workload)[1]
    users: Any = torch.compile(copy.deepcopy(workload.model), dynamic=False)
    own, _ = _measured(users, workload)
    plan = CompiledPlan(budget_bytes=own, activation_memory_budget=1.0, head_chunks=4,
                        predicted_peak_bytes=0, bound_peak_bytes=0, compute_overhead=0.0,
                        baseline_peak_bytes=0, baseline_bound_peak_bytes=0, cost_model="flops",
                        candidates=())
    compiles = counters["stats"]["unique_graphs"]
    peak, gradients = _measured(compiled_module(copy.deepcopy(workload.model), plan),
                                     workload)
    assert counters["stats"]["unique_graphs"] - compiles == 1
    assert peak < own
    assert _close(gradients, eager)
