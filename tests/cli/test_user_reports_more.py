"""Users' reports on models memprop's authors did not write (a newcomer's second list): what
`memprop run`'s table says applies, a least budget that reads as one figure, a model that
branches on values planned by `memprop.checkpoint` and advised by `memprop fit`, a compiled
model run under an eager plan, and the op of the peak in profile's JSON. Each checked against
a fact that does not come from the wording under test."""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import memprop
from memprop.units import parse_size
from memprop_cli.main import app

MODELS = '''
import torch
from torch import nn


def _mlp(width=64, depth=4):
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh())
                           for _ in range(depth)], nn.Linear(width, 10))


def mlp(batch_size=64):
    torch.manual_seed(0)
    return _mlp(), torch.randn(batch_size, 64)


def normed(batch_size=16):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Tanh())
                            for _ in range(3)], nn.Linear(32, 10))
    return model, torch.randn(batch_size, 32)


class Branches(nn.Module):
    """A forward that reads a value (bool(tensor)), as a mixture of experts' eager routing
    does: fake tensors cannot trace it."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh())
                                      for _ in range(4)])

    def forward(self, x):
        h = self.blocks(x)
        if h.sum() > 0:
            return h
        return -h


def branches(batch_size=16):
    torch.manual_seed(0)
    return Branches(), torch.randn(batch_size, 32)


def compiled(batch_size=512):
    torch.manual_seed(0)
    return torch.compile(_mlp()), torch.randn(batch_size, 64)
'''

SIZE = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s?(bytes|B|KiB|MiB|GiB)\b")


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    # Other tests import their own models.py under the same name: none is left to another.
    sys.modules.pop("models", None)
    yield tmp_path
    sys.modules.pop("models", None)


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_run_says_step_one_makes_optimizer_state_only_where_an_optimizer_keeps_state(
        models: Path) -> None:
    """Oracle: torch itself. Plain SGD (the CLI's default) keeps no state after a step, and a
    model without BatchNorm has no running statistics: the run's table must not say either;
    with Adam and BatchNorm (both keep state, checked on torch) it must say both."""
    from models import mlp, normed  # type: ignore[import-not-found]

    model, inputs = mlp()
    sgd = torch.optim.SGD(model.parameters())
    model(inputs).sum().backward()
    sgd.step()
    assert not sgd.state and not list(model.buffers())
    code, out, err = _invoke("run", "--budget", "1GiB", "--steps", "1", "--model",
                             "models.py:mlp")
    assert code == 0, err
    assert "optimizer's state" not in out and "BatchNorm" not in out
    assert not re.search(r"^\W*buffers\b", out, re.MULTILINE)

    model, inputs = normed()
    adam = torch.optim.Adam(model.parameters())
    model(inputs).sum().backward()
    adam.step()
    assert adam.state and list(model.buffers())
    code, out, err = _invoke("run", "--budget", "1GiB", "--steps", "1", "--optimizer", "adam",
                             "--model", "models.py:normed")
    assert code == 0, err
    assert "optimizer's state" in out and "BatchNorm1d statistics" in out


def test_plans_least_budget_is_one_figure_that_works(models: Path) -> None:
    """Oracle: the plan document's own min_feasible_bytes (JSON, a budget that fits) and the
    planner accepting the advised budget. Every size the refusal states must be at least the
    least feasible peak (the figure rounded to nearest read 185 KiB for a floor above it), and
    the advised budget must plan."""
    code, _, err = _invoke("plan", "--budget", "1KiB", "--model", "models.py:mlp")
    assert code == 3, err
    message = " ".join(err.split())
    advised = re.search(r"raise the budget to at least (\S+)", message)
    assert advised is not None, message
    code, out, err = _invoke("plan", "--budget", advised.group(1), "--model", "models.py:mlp",
                             "--json", "-")
    assert code == 0, err
    floor = json.loads(out)["min_feasible_bytes"]
    stated = message.split("smallest feasible peak", 1)[1]
    sizes = [parse_size(number.replace(",", "") + ("" if unit == "bytes" else unit))
             for number, unit in SIZE.findall(stated)]
    assert sizes and all(size >= floor for size in sizes), (message, floor)


def test_checkpoint_plans_a_model_that_branches_on_values_on_its_real_inputs(
        models: Path) -> None:
    """Oracle: memprop.plan of the same model and inputs on real tensors (what memprop run
    does) and the bare model's gradients. The wrapper planned on fake tensors only and raised
    ModelError; it must plan on the inputs in hand, say so, and train as the bare model does."""
    from models import branches

    model, inputs = branches()
    reference = memprop.plan(model, inputs, budget="1GiB")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = memprop.checkpoint(model, inputs, budget="1GiB")
    assert any("planned on its real inputs" in str(w.message) for w in caught)
    (chosen,) = wrapped.plans.values()
    assert chosen.peak_bytes == reference.peak_bytes
    assert chosen.baseline_peak_bytes == reference.baseline_peak_bytes

    bare, _ = branches()
    bare(inputs).sum().backward()
    wrapped(inputs).sum().backward()
    for mine, theirs in zip(model.parameters(), bare.parameters(), strict=True):
        assert mine.grad is not None and torch.equal(mine.grad, theirs.grad)


def test_fits_advice_for_a_model_that_branches_on_values_is_a_command_that_works(
        models: Path) -> None:
    """Oracle: the advised command itself, run. fit searches on fake tensors only, so 'trace
    on real tensors' was advice fit cannot follow; the refusal must name a command that
    measures the model (exit 0)."""
    code, _, err = _invoke("fit", "--budget", "1MiB", "--model", "models.py:branches")
    assert code == 2, err
    message = " ".join(err.split())
    advised = re.search(r"memprop (sweep --real --batch [\d,]+)", message)
    assert advised is not None and "trace on real tensors" not in message, message
    code, _, err = _invoke(*advised.group(1).split(), "--model", "models.py:branches")
    assert code == 0, err


def test_run_steps_a_compiled_model_eagerly_under_its_eager_plan(models: Path) -> None:
    """Oracle: dynamo's own cache of the code it compiled. An eager plan runs the compiled
    model's original module (memprop.trace.compiled): dynamo compiled the ledger's dispatch
    mode into the step, a frame per op, up to its recompile limit (8 cache entries); it must
    compile none of it, and the run must say how the model stepped. One compile (inductor)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    from memprop.trace.ledger import StorageLedger

    code, out, err = _invoke("plan", "--budget", "1GiB", "--model", "models.py:compiled",
                             "--json", "-")
    assert code == 0, err
    document = json.loads(out)
    floor, baseline = document["min_feasible_bytes"], document["baseline"]["peak_bytes"]
    assert floor < baseline  # the budget below makes the plan recompute
    code, out, err = _invoke("run", "--budget", str((floor + baseline) // 2), "--steps", "1",
                             "--model", "models.py:compiled")
    assert code == 0, err
    assert not _debug_get_cache_entry_list(StorageLedger.__torch_dispatch__.__code__)
    assert "stepped its original module eagerly" in " ".join(out.split())


def test_profiles_json_peak_names_the_op_of_the_peak(models: Path) -> None:
    """Oracle: the profile's timeline of the same step (the HTML chart's data): the op at the
    tick where the live bytes, summed over categories, are the most. The JSON peak section must
    name that op and tick, as the terminal's note does."""
    from models import mlp

    model, inputs = mlp()
    timeline = memprop.profile(model, inputs).to_dict(timeline=True)["timeline"]
    totals = [sum(values) for values in zip(*timeline["curves"].values(), strict=True)]
    tick = totals.index(max(totals))
    code, out, err = _invoke("profile", "--model", "models.py:mlp", "--json", "-")
    assert code == 0, err
    peak = json.loads(out)["peak"]
    assert (peak["op"], peak["tick"], peak["last_tick"]) == \
        (timeline["ops"][tick], tick, len(timeline["ops"]) - 1)
    assert {"phase", "breakdown"} <= peak.keys()  # additive: the old keys stay


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_compiled_runs_table_says_step_one_makes_state_only_where_it_does(
        optimizer: type[torch.optim.Optimizer]) -> None:
    """Oracle: torch's optimizer after one step (plain SGD keeps no state, Adam does). The
    compiled run's table (memprop run --compile) said 'step 1 makes the optimizer's state'
    whatever the optimizer; it must say it only where the step makes some."""
    from types import SimpleNamespace

    from rich.console import Console

    from memprop.report.terminal_compiled import render_compiled_run
    from memprop.run.compiled import CompiledRunResult
    from memprop.workload import Workload

    model = torch.nn.Linear(4, 4)
    stepper = optimizer(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    stepper.step()
    makes_state = bool(stepper.state)
    plan = SimpleNamespace(activation_memory_budget=0.5, head_chunks=0, budget_bytes=4096,
                           bound_peak_bytes=2048, predicted_peak_bytes=2048)
    result = CompiledRunResult(plan=plan, steps=1,  # type: ignore[arg-type]
                               allocator_step_peaks_bytes=(2048, 1024, 1024),
                               baseline_allocator_step_peaks_bytes=(2048, 1024, 1024),
                               allocator_source="c10", step_s=1e-3, baseline_step_s=1e-3,
                               gradients_match=True)
    console = Console(record=True, width=120)
    render_compiled_run(result, console, Workload(model=model, inputs=(torch.randn(2, 4),),
                                                  optimizer=optimizer(model.parameters())))
    assert ("optimizer's state" in console.export_text()) == makes_state


def test_fits_least_budget_is_the_figure_it_states_and_it_works(models: Path) -> None:
    """Oracle: fit's own probe of batch 1 at the advised budget (JSON probes) and fit accepting
    that budget. The refusal stated the peak rounded to nearest and advised its bytes: two
    figures; the advised size must be the one stated, at least the peak, and fit must pass."""
    code, _, err = _invoke("fit", "--budget", "1KiB", "--model", "models.py:mlp")
    assert code == 3, err
    message = " ".join(err.split())
    advised = re.search(r"raise the budget to at least (\S+)", message)
    assert advised is not None, message
    stated = message.split("training peak at batch 1,", 1)[1].split(": raise", 1)[0]
    assert advised.group(1) in stated, message
    code, out, err = _invoke("fit", "--budget", advised.group(1), "--model", "models.py:mlp",
                             "--json", "-")
    assert code == 0, err
    floor = json.loads(out)["probes"][0]["training_peak_bytes"]
    sizes = [parse_size(number.replace(",", "") + ("" if unit == "bytes" else unit))
             for number, unit in SIZE.findall(stated)]
    assert sizes and all(size >= floor for size in sizes), (message, floor)


def test_plans_least_budget_column_is_a_budget_that_plans(models: Path) -> None:
    """Oracle: the plan document's min_feasible_bytes per strategy (JSON). The table's 'least
    budget' column rounded it to nearest (185 KiB for 189,784 bytes, a budget that does not
    plan); each row's figure must parse to at least its strategy's least feasible peak."""
    code, out, err = _invoke("plan", "--budget", "1GiB", "--model", "models.py:mlp", "--json",
                             "-")
    assert code == 0, err
    document = json.loads(out)
    floors = {row["strategy"]: row["min_feasible_bytes"] for row in document["alternatives"]}
    floors[document["strategy"]] = document["min_feasible_bytes"]
    code, out, err = _invoke("plan", "--budget", "1GiB", "--model", "models.py:mlp")
    assert code == 0, err
    rows = re.findall(r"│\s*(optimal|uniform|none)\s*│.*│\s*(\S+ ?\S*B)\s*│\s*$", out,
                      re.MULTILINE)
    assert {strategy for strategy, _ in rows} == set(floors), out
    for strategy, least in rows:
        assert parse_size(least.replace(" ", "")) >= floors[strategy], (strategy, least)
