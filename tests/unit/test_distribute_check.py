"""What ``memprop distribute --run`` says of its measurements: the chosen candidate measured
over the budget is an error (memprop's model was wrong), any rank astray from its prediction a
warning; and a pipeline is refused for tied weights rather than run wrongly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from memprop.distribute import Candidate, Distribution, Rank, distribute
from memprop.errors import PlanCheckError, UsageError
from memprop.workload import Workload


def _result(measured: list[int], *, chosen: int = 0) -> Distribution:
    candidates = tuple(
        Candidate(strategy="ddp", devices=2, microbatches=1, microbatch_size=8, fits=True,
                  predicted_step_s=1.0 + i, least_budget_bytes=900,
                  ranks=(Rank(rank=0, predicted_peak_bytes=900, measured_peak_bytes=m),
                         Rank(rank=1, predicted_peak_bytes=900, measured_peak_bytes=900)))
        for i, m in enumerate(measured))
    return Distribution(devices=2, budget_bytes=1000, batch_size=16, candidates=candidates,
                        chosen=chosen, communication="")


def test_measured_as_predicted_says_nothing() -> None:
    assert _result([900, 900]).check() == (None, [])


def test_a_rank_astray_is_a_warning_and_the_chosen_over_budget_an_error() -> None:
    error, warnings = _result([1100, 900]).check()
    assert isinstance(error, PlanCheckError) and "rank 0" in str(error)
    assert len(warnings) == 1 and "above the plan's prediction" in warnings[0]
    error, warnings = _result([900, 1100]).check()
    assert error is None
    assert any("over the budget it was predicted to fit" in w for w in warnings)


def _tied(batch_size: int) -> Workload:
    embedding = nn.Linear(8, 8, bias=False)
    head = nn.Linear(8, 8, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, nn.ReLU(), head)
    return Workload(model=model, inputs=(torch.randn(batch_size, 8),),
                    targets=torch.randint(0, 8, (batch_size,)), loss_fn=F.cross_entropy)


def test_tied_weights_across_items_are_refused_for_a_pipeline() -> None:
    # Refused from the model's items, before any price: a link given and no calibration, so
    # that nothing is launched or timed.
    with pytest.raises(UsageError, match="tied weights"):
        distribute(_tied, batch_size=8, devices=2, microbatches=(2,), strategies=("pipeline",),
                   link=(1e9, 1e-5), calibrate=False)
