"""What `memprop profile` says about models its authors did not write (compiled, bfloat16, a
loss computed in the forward), checked against facts that do not come from the ledger: which
step the allocator counted, the allocator's own figures."""

from __future__ import annotations

import html
import json
import sys
from importlib import import_module
from pathlib import Path

import pytest
from typer.testing import CliRunner

import memprop
from memprop.units import format_bytes
from memprop_cli.main import app

MODELS = '''
import torch
from torch import nn
import torch.nn.functional as F


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.Tanh())
                                    for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


class ScoredInForward(nn.Module):
    """A classifier that computes its loss in its forward, as a Hugging Face model given
    labels does."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 512))

    def forward(self, x, labels):
        return F.cross_entropy(self.body(x), labels)


def scored_in_forward(batch_size=64):
    torch.manual_seed(0)
    return ScoredInForward(), (torch.randn(batch_size, 32), torch.randint(0, 512, (batch_size,)))


def patch_embedding(batch_size=8):
    """A vision transformer's stem: a 16x16 convolution of stride 16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 16, 16), nn.Flatten(), nn.Linear(64 * 16, 10))
    return model, torch.randn(batch_size, 3, 64, 64)


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 16)

    def forward(self, x):
        h = self.l(x)
        if h.sum() > 0:  # bool(tensor): aten.is_nonzero, a composite op that reads a value
            return h
        return -h


def branches(batch_size=8):
    torch.manual_seed(0)
    return Branches(), torch.randn(batch_size, 16)


class Grouped(nn.Module):
    """Experts as one grouped matrix product, as transformers' MoE layers run them: the CPU
    kernel takes float32, the fake (meta) kernel of torch asks for bfloat16."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(2, 16, 16) / 4)

    def forward(self, x):
        offsets = torch.tensor([x.shape[0] // 2, x.shape[0]], dtype=torch.int32)
        return torch.tanh(F.grouped_mm(x, self.experts, offs=offsets))


def grouped(batch_size=8):
    torch.manual_seed(0)
    return Grouped(), torch.randn(batch_size, 16)


def adapted(batch_size=8):
    """A frozen base with a trainable low-rank adapter beside it, as LoRA makes one."""
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    base.requires_grad_(False)
    adapter = nn.Sequential(nn.Linear(64, 4, bias=False), nn.Linear(4, 64, bias=False))
    model = nn.ModuleDict({"base": base, "adapter": adapter})
    model.forward = lambda x: model["base"](x) + model["adapter"](x)
    return model, torch.randn(batch_size, 64)


def compiled(batch_size=8):
    torch.manual_seed(0)
    return torch.compile(Residual()), torch.randn(batch_size, 32)


def compiled_eager_backend(batch_size=8):
    torch.manual_seed(0)
    return torch.compile(Residual(), backend="eager"), torch.randn(batch_size, 32)
'''


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _profile(spec: str, *flags: str) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(app, ["profile", "--model", spec, "--json", "-", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_a_compiled_models_measured_figure_says_it_is_the_compiled_step(models: Path) -> None:
    """Oracle: torch.compile with inductor makes memprop trace inductor's graphs and count the
    user's compiled step by the allocator (memprop.trace.compiled.measured_compiled_step):
    the report's measured source must say so, terminal and JSON alike."""
    result = CliRunner().invoke(app, ["profile", "--model", "models.py:compiled", "--json",
                                      "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert any(note.startswith("the model is torch.compile'd: the training step was traced "
                               "from the graphs") for note in document["notes"])
    source = document["measured"]["source"]
    assert "your compiled step itself" in source
    assert "inference: the original module, eagerly" in source
    assert "your compiled step itself" in " ".join(result.stderr.split())


def test_a_compiled_model_traced_eagerly_is_not_said_to_be_measured_compiled(
        models: Path) -> None:
    """Oracle: a backend other than inductor is traced eagerly (the notes say so); the
    allocator then counted the eager step, so the measured source must say it is not the
    compiled step."""
    document = _profile("models.py:compiled_eager_backend")
    assert any("not the compiled one" in note for note in document["notes"])
    assert "not your compiled step" in document["measured"]["source"]


def test_the_inference_peak_of_a_loss_computed_in_the_forward_is_the_allocators(
        models: Path) -> None:
    """Oracle: the allocator's count of the same inference pass (c10's CPU allocator through
    torch.profiler, the JSON's measured section). Under torch.inference_mode the ledger was
    handed cross_entropy whole and missed the log-softmax it makes inside: it read the logits'
    size low."""
    document = _profile("models.py:scored_in_forward")
    assert document["measured"]["inference_peak_bytes"] == \
        document["memory"]["inference_peak_bytes"]
    assert document["measured"]["training_peak_bytes"] == \
        document["memory"]["training_peak_bytes"]
    assert _profile("models.py:scored_in_forward", "--fake")["memory"] == document["memory"]


def test_a_measured_peak_above_the_ledgers_is_explained_with_the_gap(models: Path) -> None:
    """Oracle: the allocator's count (JSON measured) against the ledger's (JSON memory). The
    CPU's convolution backward allocates scratch inside the op, which no dispatch mode sees:
    the gap must be named, with its size, terminal and JSON alike."""
    result = CliRunner().invoke(app, ["profile", "--model", "models.py:patch_embedding",
                                      "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    gap = document["measured"]["training_peak_bytes"] - document["memory"]["training_peak_bytes"]
    assert gap > 0.02 * document["memory"]["training_peak_bytes"]
    said = (f"measured training peak: the allocator counted {format_bytes(gap)}")
    assert any(note.startswith(said) for note in document["notes"])
    report = " ".join(result.stderr.split())
    assert said in report
    assert report.index("measured: ") < report.index(said), "what measured is, then its gap"
    inference_gap = (document["measured"]["inference_peak_bytes"]
                     - document["memory"]["inference_peak_bytes"])
    assert any(note.startswith("measured inference peak") for note in document["notes"]) == \
        (abs(inference_gap) > 0.02 * document["memory"]["inference_peak_bytes"])


def test_a_forward_that_branches_on_a_value_is_the_users_not_a_bug(models: Path) -> None:
    """Oracle: NOTE [ Blame ]'s contract, exit 0 on real tensors (the fake pre-check skipped, as
    for any code that reads values) and one line, exit 2, with --fake. bool(tensor) reaches the
    ledger as a composite op under inference_mode; decomposing it there must not make the
    fake tensors' refusal look like memprop's own error (it exited 1 with a traceback)."""
    assert CliRunner().invoke(app, ["profile", "--model", "models.py:branches"]).exit_code == 0
    fake = CliRunner().invoke(app, ["profile", "--model", "models.py:branches", "--fake"])
    assert fake.exit_code == 2
    assert fake.stderr.startswith("memprop: error: ") and "Traceback" not in fake.output


def test_an_op_whose_fake_kernel_is_stricter_runs_for_real_and_fake_says_why(
        models: Path) -> None:
    """Oracle: plain PyTorch trains the model (torch's CPU kernel of grouped_mm takes float32);
    torch's meta kernel refuses float32. The real profile must run, unchecked on fake tensors
    as for code that reads values (it exited 2 blaming the model), its gradients the size of
    the parameter's; --fake must say the refusal is the fake kernel's."""
    sys.path.insert(0, str(models))
    try:
        model, inputs = import_module("models").grouped()
    finally:
        sys.path.remove(str(models))
        sys.modules.pop("models", None)
    model(inputs).mean().backward()
    assert model.experts.grad is not None
    real = CliRunner().invoke(app, ["profile", "--model", "models.py:grouped", "--json", "-"])
    assert real.exit_code == 0, real.output
    assert json.loads(real.stdout)["memory"]["gradients_bytes"] == model.experts.grad.nbytes
    fake = CliRunner().invoke(app, ["profile", "--model", "models.py:grouped", "--fake"])
    assert fake.exit_code == 2
    assert "(on fake tensors, in torch's fake kernel of an op" in fake.stderr


def test_frozen_parameters_are_told_apart_from_the_trained(models: Path) -> None:
    """Oracle: the adapter's parameter shapes by hand (64x4 and 4x64 float32, the trained ones;
    the base's 64x64 weight and 64 bias, frozen), and the gradients' total, which only the
    trained parameters have."""
    document = _profile("models.py:adapted")
    trained, frozen = 2 * 64 * 4 * 4, (64 * 64 + 64) * 4
    assert document["memory"]["gradients_bytes"] == trained
    assert document["memory"]["parameters_bytes"] == trained + frozen
    assert (f"parameters: {format_bytes(trained)} of them trainable, {format_bytes(frozen)} "
            "frozen") in " ".join(document["notes"])


def test_the_html_report_says_what_the_terminal_notes_say(models: Path, tmp_path: Path) -> None:
    """Oracle: the JSON document of the same run. Every note of the profile, the blocks and
    the allocator's measured peaks (the figures and where they come from) must be on the
    HTML page too; it showed none of them."""
    page = tmp_path / "p.html"
    result = CliRunner().invoke(app, ["profile", "--model", "models.py:patch_embedding",
                                      "--json", "-", "--html", str(page)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    text = html.unescape(page.read_text())
    for note in (document["blocks_note"], *document["notes"], document["measured"]["source"]):
        assert note in text
    for field in ("training_peak_bytes", "inference_peak_bytes"):
        value = document["measured"][field]
        assert f'data-field="measured.{field}" data-bytes="{value}">{format_bytes(value)}' in \
            page.read_text()


def test_a_real_sweep_runs_what_fake_tensors_cannot_trace(models: Path) -> None:
    """Oracle: memprop profile of the same model and batch on real tensors. A forward that
    branches on a value cannot be traced on fake tensors; `sweep --real` recorded every cell as
    an error of the fake trace, advising to trace on real tensors, as it was asked to."""
    result = CliRunner().invoke(app, ["sweep", "--real", "--batch", "2,4", "--model",
                                      "models.py:branches", "--json", "-"])
    assert result.exit_code == 0, result.output
    cells = json.loads(result.stdout)["cells"]
    for cell in cells:
        assert cell["status"] == "ok"
        alone = _profile("models.py:branches", "--batch", str(cell["batch_size"]))
        assert cell["training_peak_bytes"] == alone["memory"]["training_peak_bytes"]
        assert cell["inference_peak_bytes"] == alone["memory"]["inference_peak_bytes"]


def test_the_peak_note_names_the_op_whose_outputs_make_it(models: Path) -> None:
    """Oracle: the profile document's timeline (to_dict(timeline=True), the HTML chart's data)
    of the same real step: the op at its peak tick, and the number of ticks. The report said
    only 'the backward pass', beside gradients of 0 B at the peak."""
    sys.path.insert(0, str(models))
    try:
        model, inputs = import_module("models").scored_in_forward()
    finally:
        sys.path.remove(str(models))
        sys.modules.pop("models", None)
    timeline = memprop.profile(model, inputs).to_dict(timeline=True)["timeline"]
    tick = timeline["peak_tick"]
    result = CliRunner().invoke(app, ["profile", "--model", "models.py:scored_in_forward"])
    assert result.exit_code == 0, result.output
    assert (f"just after {timeline['ops'][tick]} (op tick {tick} of "
            f"{len(timeline['ops']) - 1})") in " ".join(result.stdout.split())
