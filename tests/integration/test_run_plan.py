"""Plans executed for real: measured peak against budget and prediction, gradients and BatchNorm
statistics against the unplanned step, recomputation counted in FLOPs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import memprop
from memprop.errors import UsageError
from memprop.plan import Segment, min_feasible_bytes, simulate, solve
from memprop.plan.api import chain_of
from memprop.plan.schedule import flat
from memprop.run import PlannedModule, run_plan
from memprop.run.install import installed
from memprop.workload import Workload
from tests import zoo


def mixed_mlp() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8), nn.Tanh(),
                          nn.Linear(8, 96), nn.GELU(), nn.Linear(96, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    return Workload(model=model, inputs=(torch.randn(16, 16),),
                    targets=torch.randint(0, 4, (16,)), loss_fn=F.cross_entropy,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1), name="mixed")


def dropout_mlp() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.Dropout(0.3), nn.GELU(), nn.Linear(48, 48),
                          nn.Dropout(0.5), nn.ReLU(), nn.Linear(48, 4))
    return Workload(model=model, inputs=(torch.randn(12, 16),),
                    targets=torch.randint(0, 4, (12,)), loss_fn=F.cross_entropy, name="dropout")


def transformer_stack() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(*[
        nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.1,
                                   batch_first=True)
        for _ in range(3)
    ])
    return Workload(model=model, inputs=(torch.randn(4, 6, 32),), name="transformer-stack")


def conv_bn_sgd() -> Workload:
    workload = zoo.conv_bn()
    workload.optimizer = torch.optim.SGD(workload.model.parameters(), lr=0.1)
    return workload


MODELS: dict[str, Callable[[], Workload]] = {
    "mixed-mlp": mixed_mlp,
    "dropout": dropout_mlp,
    "conv-bn": conv_bn_sgd,
    "transformer-stack": transformer_stack,
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fraction", [0.0, 0.35, 0.7])
def test_measured_peak_within_budget_and_prediction(name: str, fraction: float) -> None:
    factory = MODELS[name]
    chain = chain_of(factory(), cost_model="flops", fake=True)
    least = min_feasible_bytes(chain)[0]
    unplanned = simulate(chain, flat(len(chain))).peak_bytes
    budget = least + int(fraction * (unplanned - least))
    plan = solve(chain, budget, "optimal")
    result = run_plan(factory(), plan, steps=1)
    assert result.peak_bytes <= budget
    assert abs(plan.peak_bytes - result.peak_bytes) <= 0.02 * result.peak_bytes
    assert result.gradients_match
    assert result.buffers_match
    assert result.baseline_peak_bytes == unplanned


def test_recomputation_happens_and_is_exact_on_the_deepest_plan() -> None:
    chain = chain_of(mixed_mlp(), cost_model="flops", fake=True)
    least, _ = min_feasible_bytes(chain)
    plan = solve(chain, least, "optimal")
    assert max(plan.forward_runs) >= 3  # a multi-level schedule: nested checkpoints
    result = run_plan(mixed_mlp(), plan, steps=1)
    assert result.peak_bytes == plan.peak_bytes < result.baseline_peak_bytes
    assert result.gradients_match
    document = result.to_dict()
    assert document["measured"]["peak_bytes"] == result.peak_bytes
    assert {"step_s", "baseline_step_s"} <= set(document["measured"])
    assert document["gradients_match"] is True and document["schema_version"] == 1


def test_batchnorm_statistics_updated_once() -> None:
    workload = conv_bn_sgd()
    chain = chain_of(workload, cost_model="flops", fake=True)
    plan = solve(chain, min_feasible_bytes(chain)[0], "optimal")
    bn_stages = [i for i, m in enumerate(workload.model) if isinstance(m, nn.BatchNorm2d)]
    assert any(plan.forward_runs[i] >= 2 for i in bn_stages)  # one is recomputed
    result = run_plan(workload, plan, steps=2)
    assert result.buffers_match  # running_mean, running_var, num_batches_tracked


def test_a_recomputed_batchnorm_updates_its_statistics_as_one_plain_step_does() -> None:
    """The planner's plan at its least budget re-runs a BatchNorm's forward: the oracle is a
    plain step of an identical copy of the model, whose BatchNorms count one batch and move
    their running statistics once (torch's own checkpoint_sequential counts two). memprop's
    executor must leave the same buffers, to the bit."""
    import copy

    workload = zoo.conv_bn()
    model, x = workload.model, workload.inputs[0]
    plain = copy.deepcopy(model)
    plain(x).float().mean().backward()
    chain = chain_of(workload, cost_model="flops", fake=True)
    plan = solve(chain, min_feasible_bytes(chain)[0], "optimal")
    norms = [i for i, m in enumerate(model) if isinstance(m, nn.BatchNorm2d)]
    assert any(plan.forward_runs[i] >= 2 for i in norms)  # a norm's forward runs twice
    with installed(model, plan.stage_names, plan.tree):
        model(x).float().mean().backward()
    for i in norms:
        for name, buffer in model[i].named_buffers():
            assert torch.equal(buffer, dict(plain[i].named_buffers())[name]), (i, name)


def test_recomputed_flops_are_exactly_the_plans() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    x = torch.randn(4, 8)
    chain = chain_of(Workload(model=model, inputs=(x,)), cost_model="flops", fake=True)
    tree = Segment(start=0, stop=2, children=(Segment(start=0, stop=1, children=(0,)), 1))

    def counted() -> int:
        with FlopCounterMode(display=False) as counter:
            model(x).float().mean().backward()
        return int(counter.get_total_flops())

    unplanned = counted()
    with installed(model, [s.name for s in chain.stages], tree):
        planned = counted()
    # One recomputed matmul of 4x8 by 8x8: 2 * 4 * 8 * 8 FLOPs, and the plan says the same.
    assert planned - unplanned == 2 * 4 * 8 * 8
    assert simulate(chain, tree).compute - simulate(chain, flat(2)).compute == 2 * 4 * 8 * 8


def test_checkpoint_wrapper_holds_the_same_parameters_and_keys() -> None:
    workload = mixed_mlp()
    model = workload.model
    keys = list(model.state_dict())
    wrapped = memprop.checkpoint(model, workload.inputs, budget=10**9,
                                 loss_fn=F.cross_entropy, targets=workload.targets)
    assert isinstance(wrapped, PlannedModule)
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in model.parameters()]
    assert list(wrapped.state_dict()) == keys
    wrapped.load_state_dict(model.state_dict())  # the bare model's checkpoints load as they are
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    F.cross_entropy(wrapped(*workload.inputs), workload.targets).backward()
    optimizer.step()


def test_wrapper_without_recomputation_adds_no_ops() -> None:
    workload = mixed_mlp()
    wrapped = memprop.checkpoint(workload.model, workload.inputs, budget="1GiB")
    plan = wrapped.plan_for(*workload.inputs)
    assert plan.tree == flat(len(plan.stage_names))

    def counted(module: nn.Module) -> tuple[int, int]:
        with FlopCounterMode(display=False) as counter:
            module(*workload.inputs).float().mean().backward()
        return int(counter.get_total_flops()), len(counter.get_flop_counts()["Global"])

    assert counted(wrapped) == counted(workload.model)


def test_wrapper_replans_when_the_batch_changes_and_fits() -> None:
    workload = mixed_mlp()
    chain = chain_of(workload, cost_model="flops", fake=True)
    budget = min_feasible_bytes(chain)[0] + 2048
    wrapped = memprop.checkpoint(workload.model, workload.inputs, budget=budget,
                                 loss_fn=F.cross_entropy, targets=workload.targets)
    small = torch.randn(4, 16)
    before = torch.get_rng_state()
    wrapped(small).float().mean().backward()
    assert torch.equal(before, torch.get_rng_state())  # planning drew no random numbers
    assert len(wrapped.plans) == 2
    with pytest.raises(memprop.BudgetInfeasibleError):
        wrapped(torch.randn(64, 16))


def test_plan_api_and_package_both_work() -> None:
    import sys

    from memprop.plan.solvers import solve as imported

    workload = mixed_mlp()
    plan = memprop.plan(workload, budget="1MiB", strategy="optimal", cost_model="measured")
    assert plan.feasible and plan.cost_model == "measured"
    assert imported is solve and sys.modules["memprop.plan.solvers"].solve is solve
    fake = memprop.plan(workload.model, workload.inputs, budget=10**6, cost_model="flops",
                        fake=True, loss_fn=F.cross_entropy, targets=workload.targets)
    assert fake.baseline_peak_bytes == plan.baseline_peak_bytes
    document = plan.to_dict()
    assert {"schema_version", "budget_bytes", "strategy", "cost_model", "feasible",
            "min_feasible_bytes", "stages", "schedule", "predicted", "baseline"} <= set(document)


def test_plan_does_not_train_the_callers_model() -> None:
    workload = mixed_mlp()
    state = {k: v.clone() for k, v in workload.model.state_dict().items()}
    memprop.plan(workload, budget="1MiB", cost_model="measured")
    assert all(torch.equal(v, workload.model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in workload.model.parameters())


def test_plan_refuses_what_it_cannot_do() -> None:
    with pytest.raises(UsageError, match=r"TiedLM has none"):
        memprop.plan(zoo.tied_embeddings(), budget="1MiB")
    with pytest.raises(UsageError, match=r"on fake tensors"):
        memprop.plan(mixed_mlp(), budget="1MiB", fake=True, cost_model="measured")
    with pytest.raises(UsageError, match=r"budget is missing"):
        memprop.plan(mixed_mlp())


def test_measured_planning_leaves_the_random_generator_where_it_was() -> None:
    """Planning with measured costs traces a real step (dropout draws numbers): the caller's
    random stream must go on as if planning had not happened."""
    import torch
    from torch import nn

    import memprop

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x = torch.randn(16, 8)
    state = torch.get_rng_state()
    memprop.plan(model, x, budget="1GiB")
    assert torch.equal(torch.get_rng_state(), state)
