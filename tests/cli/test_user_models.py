"""The command line on users' own projects: their models' mistakes are exit 2 with the cause in
one line, what does not fit is exit 3 before anything runs, their packages and files import as
Python would import them, and the flags that apply to their models apply."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprop_cli.main import app

PACKAGE = '''
import torch
from torch import nn
import memprop
from mypkg.layers import Block


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(16) for _ in range(3)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.blocks(x))


def net(batch_size):
    return memprop.Workload(model=Net(), inputs=(torch.randn(batch_size, 16),),
                            targets=torch.randint(0, 4, (batch_size,)),
                            loss_fn=nn.functional.cross_entropy)


def net_and_targets(batch_size):
    return Net(), torch.randn(batch_size, 16), torch.randint(0, 4, (batch_size,))
'''

CASES = '''
import torch
from torch import nn
import torch.nn.functional as F


class Looped(nn.Module):
    """Blocks in an nn.Sequential that the forward calls one by one, not as a whole."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh())
                                      for _ in range(6)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def looped(batch_size):
    return Looped(), torch.randn(batch_size, 64)


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 8)
        self.l.requires_grad_(False)

    def forward(self, x):
        return self.l(x)


class Detached(Frozen):
    def __init__(self):
        super().__init__()
        self.l.requires_grad_(True)

    def forward(self, x):
        return self.l(x).detach()


class NoneOut(Detached):
    def forward(self, x):
        self.l(x)


class NoParams(nn.Module):
    def forward(self, x):
        return x * 2


class IntOut(Detached):
    def forward(self, x):
        return x + 1


class NoGrad(Detached):
    def forward(self, x):
        with torch.no_grad():
            return self.l(x)


class Shape(Detached):
    def __init__(self):
        super().__init__()
        self.m = nn.Linear(5, 3)

    def forward(self, x):
        h = self.l(x)
        return self.m(h)


class MonteCarlo(Detached):
    def forward(self, x):
        return F.dropout(self.l(x), 0.5, training=True)


class ReadsInConstructor(Detached):
    def __init__(self):
        super().__init__()
        self.p = [r.item() for r in torch.linspace(0, 0.1, 3)][-1]

    def forward(self, x):
        return F.dropout(self.l(x), self.p)


class ReadsInForward(Detached):
    def forward(self, x):
        h = self.l(x)
        return h if h.sum().item() > 0 else -h


def frozen(batch_size): return Frozen(), torch.randn(batch_size, 8)
def detached(batch_size): return Detached(), torch.randn(batch_size, 8)
def none_out(batch_size): return NoneOut(), torch.randn(batch_size, 8)
def no_params(batch_size): return NoParams(), torch.randn(batch_size, 8)
def int_inputs(batch_size): return IntOut(), torch.randint(0, 5, (batch_size, 8))
def no_grad(batch_size): return NoGrad(), torch.randn(batch_size, 8)
def shape_error(batch_size): return Shape(), torch.randn(batch_size, 8)
def monte_carlo(batch_size): return MonteCarlo(), torch.randn(batch_size, 8)
def reads_in_constructor(batch_size): return ReadsInConstructor(), torch.randn(batch_size, 8)
def reads_in_forward(batch_size): return ReadsInForward(), torch.randn(batch_size, 8)
def huge(batch_size): return nn.Linear(65536, 65536), torch.randn(batch_size, 65536)


class NoChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def no_chain(batch_size): return NoChain(), torch.randn(batch_size, 32)


class TwoRuns(nn.Module):
    """An encoder and a decoder, each a ModuleList called in a loop; the decoder is wider."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh())
                                     for _ in range(3))
        self.up = nn.Linear(16, 64)
        self.decoder = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.Tanh())
                                     for _ in range(3))

    def forward(self, x):
        for block in self.encoder:
            x = block(x)
        x = self.up(x)
        for block in self.decoder:
            x = block(x)
        return x


def two_runs(batch_size): return TwoRuns(), torch.randn(batch_size, 16)
'''


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A user's project: a package with two modules, a script folder with a sibling, and a file
    of models that go wrong (named by path, so that each case stands alone); the current folder
    is set to it and nothing of it is on sys.path, as with the installed command."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(PACKAGE)
    (tmp_path / "cases.py").write_text(CASES)
    (tmp_path / "mypkg" / "layers.py").write_text(textwrap.dedent('''
        from torch import nn

        class Block(nn.Sequential):
            def __init__(self, width):
                super().__init__(nn.Linear(width, width), nn.GELU())
        '''))
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "sizes.py").write_text("WIDTH = 24\n")
    (tmp_path / "scripts" / "factory.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from sizes import WIDTH

        def make(batch_size):
            model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2))
            return model, torch.randn(batch_size, WIDTH)
        '''))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith(("mypkg.", "sizes"))]:
        del sys.modules[name]


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output or "--debug" in args, result.output
    return result.exit_code, result.stdout, result.stderr


def test_a_package_in_the_current_folder_and_a_script_with_a_sibling_import(
        project: Path) -> None:
    code, out, err = _run("profile", "--model", "mypkg.models:net", "--batch", "8")
    assert code == 0, err
    assert "blocks.0" in out
    code, out, err = _run("profile", "--model", "scripts/factory.py:make", "--batch", "8")
    assert code == 0, err


def test_targets_without_a_loss_are_refused_as_in_the_python_api(project: Path) -> None:
    code, _, err = _run("profile", "--model", "mypkg.models:net_and_targets", "--batch", "8")
    assert code == 2 and err.count("\n") == 1
    assert "(model, inputs, targets) but no loss function" in err and "loss_fn=" in err


@pytest.mark.parametrize(("factory", "cause"), [
    ("frozen", "every parameter of Frozen is frozen"),
    ("detached", "does not depend on any trainable parameter"),
    ("none_out", "NoneOut.forward returned None"),
    ("no_params", "NoParams has no parameters"),
    ("int_inputs", "torch.int64 tensors, which carry no gradient"),
    ("no_grad", "torch.no_grad()"),
])
def test_a_model_with_nothing_to_train_is_exit_2_with_the_cause(project: Path, factory: str,
                                                                cause: str) -> None:
    code, _, err = _run("profile", "--model", f"cases.py:{factory}", "--batch", "4")
    assert code == 2
    assert err.startswith("memprop: error: ") and err.count("\n") == 1 and cause in err


def test_an_error_in_the_users_forward_names_its_frame(project: Path) -> None:
    code, _, err = _run("profile", "--model", "cases.py:shape_error", "--batch", "4")
    assert code == 2 and err.count("\n") == 1
    assert "raised RuntimeError" in err and "cases.py:" in err and "return self.m(h)" in err
    assert "--debug" in err
    result = CliRunner().invoke(app, ["--debug", "profile", "--model", "cases.py:shape_error",
                                      "--batch", "4"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "return self.m(h)" in result.stderr


def test_monte_carlo_dropout_in_the_model_is_traced(project: Path) -> None:
    code, out, err = _run("profile", "--model", "cases.py:monte_carlo", "--batch", "4",
                          "--json", "-")
    assert code == 0, err
    document = json.loads(out)
    # The mask is the one activation saved (the linear layer saves the model's input); the
    # inference pass draws one too (training=True whatever the mode).
    assert [(t["module"], t["shape"]) for t in document["saved_tensors"]] == [("MonteCarlo",
                                                                              [4, 8])]


def test_a_constructor_that_reads_values_is_built_for_real_then_traced_fake(
        project: Path) -> None:
    code, out, err = _run("profile", "--model", "cases.py:reads_in_constructor",
                          "--batch", "4", "--fake")
    assert code == 0, err
    assert "built for real" in out
    code, _, err = _run("profile", "--model", "cases.py:reads_in_forward", "--batch", "4",
                        "--fake")
    assert code == 2 and "fake tensors" in err and "trace on real tensors" in err
    code, _, err = _run("profile", "--model", "cases.py:reads_in_forward", "--batch", "4")
    assert code == 0, err


def test_what_cannot_fit_is_refused_before_it_runs(project: Path) -> None:
    code, _, err = _run("profile", "--batch", "1000000000000")
    assert code == 3 and "(the closed form's least)" in err and "available" in err
    assert "nothing was run" in err
    code, _, err = _run("profile", "--model", "cases.py:huge", "--batch", "4")
    assert code == 3 and "needs 32.00 GiB" in err  # 16 GiB of weights and their gradient
    code, _, err = _run("profile", "--batch", "99999999999999999999999", "--fake")
    assert code == 2 and "--batch" in err


def test_the_built_in_flags_apply_to_a_users_model_or_are_refused(project: Path) -> None:
    code, _, err = _run("profile", "--model", "cases.py:no_chain", "--hidden", "3")
    assert code == 2 and "--hidden shapes the built-in MLP" in err
    code, _, err = _run("profile", "--model", "cases.py:no_chain", "--optimizer", "nonexistent")
    assert code == 2 and "'nonexistent'" in err
    code, out, err = _run("profile", "--model", "cases.py:no_chain", "--batch", "8", "--fake",
                          "--dtype", "float64", "--optimizer", "adamw", "--json", "-")
    assert code == 0, err
    document = json.loads(out)
    assert document["workload"]["dtype"] == "float64"
    parameters = document["memory"]["parameters_bytes"]
    assert parameters == 8 * (32 * 32 + 32 + 32 * 2 + 2)  # float64
    # AdamW's two moments, and a step counter (a float32 scalar) per parameter tensor.
    assert document["memory"]["optimizer_state_bytes"] == 2 * parameters + 4 * 4


def test_fit_keeps_the_plain_answer_for_a_model_it_cannot_plan(project: Path) -> None:
    code, out, err = _run("fit", "--model", "cases.py:no_chain", "--budget", "1MiB",
                          "--json", "-")
    assert code == 0, err
    document = json.loads(out)
    assert document["max_batch_size"] > 1
    assert document["max_batch_size_with_checkpointing"] is None
    assert document["checkpointing_note"].startswith("no row: the planner cannot plan")


def test_blocks_called_in_a_loop_are_planned_and_run(project: Path) -> None:
    # The least budget is 547 KiB, the unplanned peak 690 KiB: the plan must recompute.
    code, out, err = _run("run", "--model", "cases.py:looped", "--batch", "256",
                          "--budget", "600KiB", "--steps", "1", "--json", "-")
    assert code == 0, err
    document = json.loads(out)
    assert [s["name"] for s in document["stages"]] == [f"layers.{i}.{j}" for i in range(6)
                                                       for j in range(2)]
    assert document["measured"]["peak_bytes"] <= 600 * 1024
    assert document["gradients_match"] is True


def test_plan_then_run_with_the_same_arguments_run_the_same_plan(project: Path) -> None:
    arguments = ["--hidden", "64", "--depth", "6", "--batch", "256", "--budget", "1.6MiB"]
    code, planned, err = _run("plan", *arguments, "--json", "-")
    assert code == 0, err
    code, ran, err = _run("run", *arguments, "--steps", "1", "--json", "-")
    assert code == 0, err
    plan, run = json.loads(planned), json.loads(ran)
    assert plan["cost_model"] == run["cost_model"] == "roofline"  # same rates: one cache
    assert plan["tree"] == run["tree"] and plan["predicted"] == run["predicted"]
    assert run["measured"]["peak_bytes"] == plan["traced_peak_bytes"]


def test_the_report_names_the_runs_and_blocks_picks_another(project: Path) -> None:
    code, out, err = _run("profile", "--model", "cases.py:two_runs", "--batch", "64", "--fake")
    assert code == 0, err
    text = " ".join(out.split())
    assert "blocks: decoder.0.0 .. decoder.2.1 (6 " in text  # the run that saves the most
    assert "other runs: encoder.0.0 .. encoder.2.1 (6 " in text and "--blocks NAME" in text
    code, out, err = _run("plan", "--model", "cases.py:two_runs", "--batch", "64",
                          "--blocks", "encoder", "--budget", "1GiB", "--json", "-")
    assert code == 0, err
    names = [s["name"] for s in json.loads(out)["stages"]]
    blocks = [n for n in names if n not in ("(prefix)", "(suffix)")]
    assert blocks == [f"encoder.{i}.{j}" for i in range(3) for j in range(2)]
    code, _, err = _run("plan", "--model", "cases.py:two_runs", "--blocks", "encoders",
                        "--budget", "1GiB")
    assert code == 2
    assert "'encoders' is not an nn.Sequential or nn.ModuleList" in err
    assert "encoder, " in err and "decoder" in err  # what there is to name


def test_fake_stage_times_are_not_shown_as_times(project: Path) -> None:
    code, out, _ = _run("profile", "--hidden", "32", "--depth", "2", "--batch", "8", "--fake")
    assert code == 0
    stages = out[out.index("Stages"):]
    assert " ms " not in stages and "stage times: none on fake tensors" in out
