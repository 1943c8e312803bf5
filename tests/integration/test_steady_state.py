"""Figures that hold at every step of a training loop, not only the first.

The oracle is a plain loop (``zero_grad``, forward, loss, backward, ``optimizer.step()``) with
PyTorch's MemTracker, or memprop's ledger as an independent dispatch mode, around one step."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memprop
from memprop.plan import min_feasible_bytes, simulate
from memprop.plan.api import chain_of
from memprop.plan.schedule import flat
from memprop.trace.ledger import StorageLedger
from memprop.trace.step import register_step_state
from memprop.workload import Workload
from tests.unit.test_ledger import _memtracker_peak

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-wd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p),
    "adam-wd": lambda p: torch.optim.Adam(p, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, weight_decay=0.0),
    "adamw-wd": lambda p: torch.optim.AdamW(p, weight_decay=0.1),
}


def mlp(optimizer: str, *, set_to_none: bool = True, batch: int = 64) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 96), nn.GELU(),
                          nn.Linear(96, 48), nn.Tanh(), nn.Linear(48, 5))
    return Workload(model=model, inputs=(torch.randn(batch, 32),),
                    targets=torch.randint(0, 5, (batch,)), loss_fn=F.cross_entropy,
                    optimizer=OPTIMIZERS[optimizer](list(model.parameters())),
                    name="mlp", set_to_none=set_to_none)


def convnet(optimizer: str, *, set_to_none: bool = True) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return Workload(model=model, inputs=(torch.randn(6, 3, 16, 16),),
                    targets=torch.randint(0, 10, (6,)), loss_fn=F.cross_entropy,
                    optimizer=OPTIMIZERS[optimizer](list(model.parameters())),
                    name="convnet", set_to_none=set_to_none)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("set_to_none", [True, False])
def test_training_peak_is_the_third_steps(optimizer: str, set_to_none: bool) -> None:
    result = memprop.profile(mlp(optimizer, set_to_none=set_to_none))
    assert result.training_peak_bytes == _memtracker_peak(
        mlp(optimizer, set_to_none=set_to_none), step=3)
    assert result.first_step_peak_bytes == _memtracker_peak(
        mlp(optimizer, set_to_none=set_to_none), step=1)
    assert result.required_bytes == max(result.training_peak_bytes,
                                        result.first_step_peak_bytes)
    fake = memprop.profile(mlp(optimizer, set_to_none=set_to_none), fake=True)
    assert fake.memory == result.memory


@pytest.mark.parametrize("optimizer", ["momentum", "adamw-wd"])
def test_the_steady_step_holds_the_state_the_first_step_makes(optimizer: str) -> None:
    result = memprop.profile(convnet(optimizer))
    assert result.training_peak_bytes == _memtracker_peak(convnet(optimizer), step=3)
    params = result.memory.parameters_bytes
    moments = 1 if optimizer == "momentum" else 2
    assert result.memory.optimizer_state_bytes >= moments * params
    # Held through forward and backward from the second step on: the steady peak is the higher.
    assert result.training_peak_bytes > result.first_step_peak_bytes


def test_a_workload_in_mid_training_is_already_steady() -> None:
    workload = mlp("adamw-wd")
    for _ in range(2):
        workload.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(workload.model(*workload.inputs), workload.targets).backward()
        workload.optimizer.step()
    result = memprop.profile(workload)
    assert result.first_step_peak_bytes is None
    assert result.training_peak_bytes == memprop.profile(mlp("adamw-wd")).training_peak_bytes
    # The fake mirror carries the optimizer's state over: it is steady from its first step too.
    fake = memprop.profile(workload, fake=True)
    assert fake.first_step_peak_bytes is None
    assert fake.training_peak_bytes == result.training_peak_bytes


def _loop_peaks(model: nn.Module, workload: Workload, steps: int) -> list[int]:
    """The ledger's peak of each step of a plain loop over ``model`` (possibly wrapped). The
    loop keeps the output until the step ends, as one that logs it does (and as memprop
    assumes: a loop that drops it earlier peaks lower, never higher)."""
    optimizer = workload.optimizer
    assert optimizer is not None
    peaks = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=workload.set_to_none)
        ledger = StorageLedger()
        register_step_state(ledger, workload, training=True)
        with ledger:
            output = model(*workload.inputs)
            loss = F.cross_entropy(output, workload.targets)
            loss.backward()
            optimizer.step()
            del output, loss
        peaks.append(ledger.peak()[0])
    return peaks


@pytest.mark.parametrize("fraction", [0.0, 0.4, 0.8])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_checkpoint_holds_its_budget_at_every_step_with_adamw(fraction: float,
                                                              set_to_none: bool) -> None:
    workload = mlp("adamw-wd", set_to_none=set_to_none, batch=256)
    chain = chain_of(workload, cost_model="flops", fake=True)
    least = min_feasible_bytes(chain)[0]
    unplanned = simulate(chain, flat(len(chain))).peak_bytes
    budget = least + int(fraction * (unplanned - least))
    wrapped = memprop.checkpoint(workload.model, workload.inputs, budget=budget,
                                 loss_fn=F.cross_entropy, targets=workload.targets,
                                 optimizer=workload.optimizer, set_to_none=set_to_none)
    plan = wrapped.plan_for(*workload.inputs)
    peaks = _loop_peaks(wrapped, workload, steps=4)
    assert max(peaks) <= budget
    assert max(peaks) == plan.peak_bytes  # predicted to the byte, the first step included
    # The unplanned loop breaks the budget from its second step (unless the budget is its own).
    other = mlp("adamw-wd", set_to_none=set_to_none, batch=256)
    plain = _loop_peaks(other.model, other, steps=4)
    assert plain[1:] == [unplanned] * 3
    assert plain[0] < unplanned  # the first step: no optimizer state yet


def test_fit_finds_a_batch_that_fits_at_every_step() -> None:
    from memprop.estimate import fit

    def build(batch_size: int, depth: int | None) -> Workload:
        return mlp("adamw-wd", batch=batch_size)

    budget = 3 * 2**20
    found = fit(build, budget_bytes=budget)
    workload = mlp("adamw-wd", batch=found.max_batch_size)
    assert max(_loop_peaks(workload.model, workload, steps=3)) <= budget
    over = mlp("adamw-wd", batch=found.max_batch_size + 1)
    assert max(_loop_peaks(over.model, over, steps=3)) > budget
