"""The seed's exercise 3: the closed form of the built-in MLP equals the traced ledger."""

from __future__ import annotations

import itertools

import pytest

import memprop
from memprop.workload import SeedConfig, seed_workload

GRID = list(itertools.product(["relu", "gelu", "tanh", "sigmoid"], [False, True], [0.0, 0.1],
                              ["sgd", "momentum", "adam", "adamw"]))


@pytest.mark.parametrize(("activation", "bias", "weight_decay", "optimizer"), GRID)
def test_closed_form_equals_the_trace(activation: str, bias: bool, weight_decay: float,
                                      optimizer: str) -> None:
    workload = seed_workload(SeedConfig(input_dim=5, hidden=9, classes=4, depth=3, batch=6,
                                        activation=activation, bias=bias,
                                        weight_decay=weight_decay, optimizer=optimizer))
    result = memprop.profile(workload)
    assert result.closed_form is not None
    for field, value in result.closed_form.items():
        assert value == getattr(result.memory, field), field
    # With Adam the step's own temporaries are not in closed form: the training peak is left out.
    assert ("training_peak_bytes" in result.closed_form) == (optimizer in ("sgd", "momentum"))
    if optimizer == "momentum":  # the steady step holds the buffers from its start
        first = result.closed_form["first_step_peak_bytes"]
        assert result.closed_form["training_peak_bytes"] > first


@pytest.mark.parametrize(("dtype", "depth", "batch"), [("float64", 1, 1), ("float32", 6, 33),
                                                       ("float64", 2, 128)])
def test_closed_form_across_sizes_and_dtypes(dtype: str, depth: int, batch: int) -> None:
    workload = seed_workload(SeedConfig(input_dim=7, hidden=13, classes=3, depth=depth,
                                        batch=batch, dtype=dtype))
    result = memprop.profile(workload)
    assert result.closed_form == {
        field: getattr(result.memory, field) for field in result.closed_form
    }
