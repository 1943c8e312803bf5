"""The cost models: the roofline prices memory-bound work that FLOPs call free, from rates
measured once per machine."""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from memprop.calibration import rates as calibration
from memprop.calibration.rates import Probe
from memprop.errors import UsageError
from memprop.plan.api import chain_of
from memprop.plan.costs import check_cost_model
from memprop.workload import Workload


def test_rates_are_measured_once_then_read_from_the_cache(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = calibration.machine_rates("cpu")
    # a measurement passes its own check
    assert calibration.Rates.from_cached(asdict(first)) == first
    cached = json.loads((tmp_path / "memprop" / "rates.json").read_text())
    assert len(cached) == 1
    monkeypatch.setattr(calibration, "_measure", lambda kind: pytest.fail("measured again"))
    assert calibration.machine_rates("cpu") == first


def test_an_unknown_cost_model_is_refused() -> None:
    with pytest.raises(UsageError, match="roofline, flops, measured"):
        check_cost_model("wallclock")
    check_cost_model("measured")  # real tensors have the times it prices by
    with pytest.raises(UsageError, match="on fake tensors"):
        check_cost_model("measured", fake=True)


def test_the_roofline_prices_what_flops_call_free(monkeypatch: pytest.MonkeyPatch) -> None:
    # Linear, ReLU, BatchNorm: FLOPs price the pointwise stages at 0, the roofline by their bytes.
    # A pointwise call's own timing on this machine (what it costs beyond its bytes, cached) is
    # another test's: here every call costs its bytes, whatever the cache holds.
    plan_api = importlib.import_module("memprop.plan.api")  # memprop.plan is also a function
    monkeypatch.setattr(plan_api, "pointwise_seconds",
                        lambda device, probes, rates: dict.fromkeys(probes, 0.0))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.BatchNorm1d(64), nn.Linear(64, 8))
    workload = Workload(model=model, inputs=(torch.randn(128, 64),))
    flops = chain_of(workload, cost_model="flops", fake=True)
    roofline = chain_of(workload, cost_model="roofline", fake=True)
    rates = calibration.machine_rates("cpu")
    assert [s.forward_cost == 0 for s in flops.stages] == [False, True, True, False]
    assert all(s.forward_cost > 0 for s in roofline.stages)
    relu = roofline.stages[1]
    moved = 2 * 128 * 64 * 4  # reads its input, writes its output
    launches = 1  # one op: aten.relu
    assert relu.forward_cost == pytest.approx(moved / rates.bytes_per_s
                                              + launches * rates.op_s)
    assert rates.describe() in roofline.cost_note


def test_pointwise_calls_that_cost_more_than_their_bytes_are_timed_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No timing is asserted (a loaded machine times anything): the timer answers a known number
    # of seconds per call, and the excess is what those seconds leave beyond the call's bytes.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rates = calibration.Rates(flops_per_s=1e10, bytes_per_s=1e10, op_s=1e-6, selective_op_s=1e-5,
                        source="known")
    n = calibration.POINTWISE_ELEMENTS
    per_call = {"aten.tanh.default": 1e-3, "aten.add.Tensor": 1e-6}
    called: list[str] = []

    def timed(run: object, repeats: int, kind: str = "cpu") -> float:
        name = called[-1]
        return per_call[name]

    real_excess = calibration._excess

    def excess(probe: Probe, rates: calibration.Rates) -> float:
        called.append(probe[0])
        return real_excess(probe, rates)

    monkeypatch.setattr(calibration, "_best_of", timed)
    monkeypatch.setattr(calibration, "_excess", excess)
    tanh = ("aten.tanh.default", (("tensor", "float32", True),), ())
    add = ("aten.add.Tensor", (("tensor", "float32", True), ("tensor", "float32", True)), ())
    unknown = ("aten.no_such_op.default", (("tensor", "float32", True),), ())
    found = calibration.pointwise_seconds("cpu", [tanh, add, unknown], rates)
    # tanh reads and writes n float32s: its seconds beyond those bytes, per element.
    assert found[tanh] == pytest.approx((1e-3 - 2 * 4 * n / 1e10) / n)
    # add reads two and writes one, in less time than its bytes take: nothing beyond them.
    assert found[add] == 0.0 and found[unknown] == 0.0
    monkeypatch.setattr(calibration, "_excess", lambda probe, rates: pytest.fail("timed again"))
    assert calibration.pointwise_seconds("cpu", [tanh, add], rates) == {tanh: found[tanh],
                                                                   add: found[add]}
    assert calibration.pointwise_seconds("cuda", [tanh], rates) == {tanh: 0.0}  # bytes bound there
