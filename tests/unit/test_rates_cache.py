"""The rates cache is input: whatever stands at its path is checked, and what cannot be used is
measured again with one warning line (NOTE [ A cache is input ] in memprop.calibration.cache); rates
are measured robustly and again on purpose by ``memprop calibrate``. No figure here is timed:
the measurement is replaced by known rates."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from memprop.calibration import cache
from memprop.calibration import rates as calibration
from memprop.plan.api import chain_of
from memprop.plan.solvers import solve
from memprop.workload import Workload
from memprop_cli.main import app

KNOWN = calibration.Rates(flops_per_s=2e10, bytes_per_s=1e10, op_s=2e-6, selective_op_s=2e-5,
                    source="known")


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A cache in ``tmp_path`` and a measurement that returns ``KNOWN`` (counted)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cache, "_warned", set())
    monkeypatch.setattr(cache, "_unwritten", {})
    measured: list[str] = []

    def measure(kind: str) -> calibration.Rates:
        measured.append(kind)
        return KNOWN

    monkeypatch.setattr(calibration, "_measure", measure)
    return measured


def _cache_path(tmp_path: Path) -> Path:
    return tmp_path / "memprop" / "rates.json"


def _write(tmp_path: Path, text: str) -> None:
    _cache_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    _cache_path(tmp_path).write_text(text)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _finite(rates: calibration.Rates) -> bool:
    return all(math.isfinite(v) and v >= 0 for v in
               (rates.flops_per_s, rates.bytes_per_s, rates.op_s, rates.selective_op_s))


GOOD = {"flops_per_s": 2e10, "bytes_per_s": 1e10, "op_s": 2e-6, "selective_op_s": 2e-5,
        "source": "cached"}


@pytest.mark.parametrize("entry", [
    {**GOOD, "flops_per_s": "fast"},
    {**GOOD, "bytes_per_s": None},
    {**GOOD, "flops_per_s": 0},
    {**GOOD, "bytes_per_s": 0.0, "op_s": 0},
    {**GOOD, "op_s": -1e-6},
    {**GOOD, "flops_per_s": float("inf")},
    {**GOOD, "bytes_per_s": float("nan")},
    {**GOOD, "flops_per_s": 1e300},
    {**GOOD, "op_s": True},
    {**GOOD, "source": 7},
    {"flops_per_s": 2e10},
    "2e10",
    None,
    [1, 2],
], ids=lambda e: json.dumps(e, allow_nan=True)[:40])
def test_an_unusable_entry_is_measured_again_with_one_warning(
        entry: Any, fresh: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = calibration.machine_key("cpu")
    _write(tmp_path, json.dumps({key: entry}))
    rates = calibration.machine_rates("cpu")
    assert rates.flops_per_s == KNOWN.flops_per_s and _finite(rates) and fresh
    assert len(_warnings(caplog)) == 1 and "measured again" in _warnings(caplog)[0]
    assert json.loads(_cache_path(tmp_path).read_text())[key]["flops_per_s"] == KNOWN.flops_per_s
    calibration.machine_rates("cpu")  # now good: neither measured nor warned again
    assert len(_warnings(caplog)) == 1


@pytest.mark.parametrize("text", ["{not json", '{"a": NaN}', "[]", "", "\x00\xff"])
def test_an_unreadable_cache_file_is_measured_again(
        text: str, fresh: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path, text)
    assert calibration.machine_rates("cpu").flops_per_s == KNOWN.flops_per_s
    assert len(_warnings(caplog)) <= 1 and fresh
    assert calibration.machine_key("cpu") in json.loads(_cache_path(tmp_path).read_text())


def test_a_fifo_at_the_cache_path_neither_hangs_nor_is_trusted(
        fresh: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _cache_path(tmp_path).parent.mkdir(parents=True)
    os.mkfifo(_cache_path(tmp_path))
    found: list[calibration.Rates] = []
    worker = threading.Thread(target=lambda: found.append(calibration.machine_rates("cpu")),
                              daemon=True)
    worker.start()
    worker.join(60)
    assert found and found[0].flops_per_s == KNOWN.flops_per_s
    assert any("not a regular file" in w for w in _warnings(caplog))


def test_a_folder_at_the_cache_path_is_measured_once_per_process(
        fresh: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _cache_path(tmp_path).mkdir(parents=True)
    first = calibration.machine_rates("cpu")
    count = len(fresh)
    assert calibration.machine_rates("cpu") == first and len(fresh) == count
    assert len(_warnings(caplog)) == 2  # cannot read it; cannot write it
    assert len(set(_warnings(caplog))) == 2


def test_a_relative_xdg_cache_home_is_ignored(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert cache.cache_file() == tmp_path / ".cache" / "memprop" / "rates.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "abs"))
    assert cache.cache_file() == tmp_path / "abs" / "memprop" / "rates.json"


@pytest.mark.parametrize("value", ["slow", None, -1.0, float("inf"), 1e9])
def test_an_unusable_pointwise_timing_is_timed_again(
        value: Any, fresh: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tanh = ("aten.tanh.default", (("tensor", "float32", True),), ())
    key = calibration.machine_key("cpu") + "|pointwise"
    _write(tmp_path, json.dumps({key: {json.dumps(tanh): value}}))
    monkeypatch.setattr(calibration, "_excess", lambda probe, rates: 3e-9)
    assert calibration.pointwise_seconds("cpu", [tanh], KNOWN) == {tanh: 3e-9}
    assert len(_warnings(caplog)) == 1
    assert json.loads(_cache_path(tmp_path).read_text())[key] == {json.dumps(tanh): 3e-9}


def test_a_plan_priced_from_a_poisoned_cache_is_finite_json(
        fresh: list[str], tmp_path: Path) -> None:
    key = calibration.machine_key("cpu")
    _write(tmp_path, json.dumps({key: {**GOOD, "flops_per_s": float("nan"),
                                       "bytes_per_s": float("inf")}}, allow_nan=True))
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    chain = chain_of(Workload(model=model, inputs=(torch.randn(4, 8),)), cost_model="roofline",
                     fake=True)
    plan = solve(chain, 1 << 30)
    json.dumps(plan.to_dict(), allow_nan=False)  # raises on NaN or Infinity
    assert math.isfinite(plan.compute_overhead)


def test_the_fastest_of_rounds_is_kept_and_a_slower_one_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slow = calibration.Rates(flops_per_s=1e10, bytes_per_s=4e9, op_s=5e-6, selective_op_s=6e-5,
                       source="round")
    fast = calibration.Rates(flops_per_s=3e10, bytes_per_s=2e9, op_s=2e-6, selective_op_s=2e-5,
                       source="round")
    rounds = iter([slow, fast, fast])
    monkeypatch.setattr(calibration, "_measure", lambda kind: next(rounds))
    rates = calibration.measure_rates("cpu")
    # Per figure the best: flops and bytes from different rounds, the least times.
    assert (rates.flops_per_s, rates.bytes_per_s, rates.op_s, rates.selective_op_s) == (
        3e10, 4e9, 2e-6, 2e-5)
    assert "best of 3 rounds" in rates.source and "slower" not in rates.source
    agreeing = iter([slow, slow])
    monkeypatch.setattr(calibration, "_measure", lambda kind: next(agreeing))
    again = calibration.measure_rates("cpu", previous=rates)
    assert "best of 2 rounds" in again.source and "slower than" in again.source


def test_concurrent_processes_measure_once(fresh: list[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    gate = threading.Event()

    def measure(kind: str, previous: Any = None) -> calibration.Rates:
        calls.append(1)
        gate.wait(5)  # the others reach the lock meanwhile
        return KNOWN

    monkeypatch.setattr(calibration, "measure_rates", measure)
    found: list[calibration.Rates] = []
    workers = [threading.Thread(target=lambda: found.append(calibration.machine_rates("cpu")))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    gate.set()
    for worker in workers:
        worker.join(60)
    assert len(calls) == 1 and found == [KNOWN] * 3


@pytest.mark.install
def test_memprop_calibrate_measures_again_and_prints_both(fresh: list[str],
                                                          tmp_path: Path) -> None:
    key = calibration.machine_key("cpu")
    older = {**GOOD, "flops_per_s": 1e9, "source": "older"}
    tanh = json.dumps(("aten.tanh.default", (("tensor", "float32", True),), ()))
    _write(tmp_path, json.dumps({key: older, key + "|pointwise": {tanh: 1e-9}}))
    result = CliRunner().invoke(app, ["calibrate", "--json", str(tmp_path / "out.json")])
    assert result.exit_code == 0, result.output
    assert "20.0 GFLOP/s" in result.output and "1.0 GFLOP/s" in result.output
    cached = json.loads(_cache_path(tmp_path).read_text())
    assert cached[key]["flops_per_s"] == KNOWN.flops_per_s
    assert key + "|pointwise" not in cached  # re-timed at the new rates by the next plan
    document = json.loads((tmp_path / "out.json").read_text())
    assert document["previous"]["flops_per_s"] == 1e9
    bad = CliRunner().invoke(app, ["calibrate", "--device", "tpu"])
    assert bad.exit_code == 2 and "memprop: error: cannot calibrate device 'tpu'" in bad.output


def test_calibrate_keeps_the_faster_cached_figures_unless_fresh(fresh: list[str],
                                                                tmp_path: Path) -> None:
    key = calibration.machine_key("cpu")
    faster = {**GOOD, "flops_per_s": 5e10, "op_s": 1e-6, "source": "idle"}
    _write(tmp_path, json.dumps({key: faster}))
    rates, previous = calibration.calibrate("cpu")  # measured KNOWN: slower in both figures
    assert previous is not None and previous.flops_per_s == 5e10
    assert (rates.flops_per_s, rates.bytes_per_s, rates.op_s) == (5e10, 1e10, 1e-6)
    assert "slower than" in rates.source and "kept" in rates.source
    result = CliRunner().invoke(app, ["calibrate", "--fresh"])
    assert result.exit_code == 0, result.output
    cached = json.loads(_cache_path(tmp_path).read_text())[key]
    assert (cached["flops_per_s"], cached["op_s"]) == (KNOWN.flops_per_s, KNOWN.op_s)


def test_rates_measured_on_a_busy_machine_say_so(fresh: list[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    assert "the machine was busy (load average 64.0" in calibration.machine_rates("cpu").source
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert "busy" not in calibration.measure_rates("cpu").source


def test_plans_are_the_same_run_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Measured for real once (into tmp_path), then read: two plans price alike to the byte.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = ["plan", "--fake", "--depth", "6", "--batch", "4096", "--hidden", "64", "--input-dim",
            "64", "--budget", "7MiB", "--json", "-"]
    first, second = (CliRunner().invoke(app, args) for _ in range(2))
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == json.loads(second.stdout)


def test_a_lock_held_forever_does_not_hang_a_measurement(
        fresh: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import fcntl

    monkeypatch.setattr(cache, "LOCK_WAIT_S", 0.2)
    lock = tmp_path / "memprop" / "rates.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:  # another process, stopped while it measured
        fcntl.flock(held, fcntl.LOCK_EX)
        assert calibration.machine_rates("cpu").flops_per_s == KNOWN.flops_per_s
    assert any("stayed locked" in w for w in _warnings(caplog))
