"""The chain model against the ledger: the unplanned predicted peak is the traced peak."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memprop
from memprop.plan import Chain, min_feasible_bytes, simulate, solve
from memprop.plan.api import chain_of
from memprop.plan.schedule import flat
from memprop.run import run_plan
from memprop.workload import SeedConfig, Workload, seed_workload
from tests import zoo


def _predicted_and_traced(workload: Workload) -> tuple[int, int]:
    costs = memprop.profile(workload).chain
    assert costs is not None
    chain = Chain.from_chain_costs(costs, cost_model="flops")
    return simulate(chain, flat(len(chain))).peak_bytes, costs.traced_peak_bytes


@pytest.mark.parametrize(
    ("depth", "batch", "activation", "bias", "optimizer"),
    [(1, 8, "relu", False, "sgd"), (2, 8, "gelu", True, "sgd"), (4, 64, "tanh", False, "adam"),
     (3, 32, "sigmoid", True, "momentum"), (6, 128, "relu", True, "sgd"),
     (5, 3, "gelu", False, "adam")],
)
def test_seed_mlp_unplanned_peak_is_the_traced_peak(
    depth: int, batch: int, activation: str, bias: bool, optimizer: str
) -> None:
    workload = seed_workload(SeedConfig(input_dim=16, hidden=32, classes=4, depth=depth,
                                        batch=batch, activation=activation, bias=bias,
                                        optimizer=optimizer))
    predicted, traced = _predicted_and_traced(workload)
    assert predicted == traced


@pytest.mark.parametrize("weight_decay", [0.1, 0.01])
def test_seed_mlp_with_weight_decay_within_two_percent(weight_decay: float) -> None:
    # The L2 term's gradients are born in the loss's backward and held by the engine until
    # each stage's own arrives (NOTE [ Gradients summed in the engine ] in trace/step.py): the
    # model over-predicts by the largest of them (safe, and under 2%).
    workload = seed_workload(SeedConfig(input_dim=16, hidden=32, classes=4, depth=4, batch=64,
                                        weight_decay=weight_decay, optimizer="adam"))
    predicted, traced = _predicted_and_traced(workload)
    assert traced <= predicted <= traced * 1.02


@pytest.mark.parametrize("name", ["relu-mlp", "gelu-mlp", "conv-bn", "transformer"])
def test_zoo_unplanned_peak_is_the_traced_peak(name: str) -> None:
    predicted, traced = _predicted_and_traced(zoo.ZOO[name]())
    assert predicted == traced


def test_in_place_and_view_stages_alias_their_inputs() -> None:
    costs = memprop.profile(zoo.conv_bn()).chain
    assert costs is not None
    chain = Chain.from_chain_costs(costs)
    # ReLU(inplace=True) (stage 5) and Flatten (stage 7) hand on their input's storage.
    assert [s.aliases_input for s in chain.stages] == [False] * 5 + [True, False, True, False]
    assert chain.atoms() == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6), (6, 8), (8, 9)]


class _SumLoss(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class _SquareLoss(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).mean()


def _loss_in_chain(loss: nn.Module, last_relu: bool) -> Workload:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(3)]
    if not last_relu:
        layers.append(nn.Linear(64, 64))
    model = nn.Sequential(*layers, loss)
    return Workload(model=model, inputs=(torch.randn(32, 64),),
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("loss", [_SumLoss, _SquareLoss])
@pytest.mark.parametrize("last_relu", [True, False])
def test_a_chain_that_returns_the_loss_is_never_under_predicted(loss: type[nn.Module],
                                                                 last_relu: bool) -> None:
    # The loss's seed (the gradient of the chain's output) is held by torch.autograd.backward
    # until the backward is over: the planner used to free it after the last stage, 4 bytes
    # under the ledger, so a plan at the least feasible budget ran 4 bytes over it.
    predicted, traced = _predicted_and_traced(_loss_in_chain(loss(), last_relu))
    if loss is _SumLoss:
        # x.sum()'s backward hands on an expanded view of the 4-byte seed, which the chain
        # model charges as a full gradient of x (over, never under: plan/chain.py's docstring).
        assert traced <= predicted <= traced + 32 * 64 * 4
    else:
        assert predicted == traced
    chain = chain_of(_loss_in_chain(loss(), last_relu), cost_model="flops", fake=True)
    least = min_feasible_bytes(chain)[0]
    result = run_plan(_loss_in_chain(loss(), last_relu), solve(chain, least), steps=1)
    assert result.peak_bytes <= least
