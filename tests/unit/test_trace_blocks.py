"""Finding the run of blocks (``memprop.trace.blocks``): the oracle is each model's own structure,
its containers' items in the order the forward calls them, read from ``named_modules``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memprop.errors import UsageError
from memprop.trace.step import trace_training_step
from memprop.workload import Workload


def _stages(model: nn.Module, *inputs: torch.Tensor, blocks: str | None = None
            ) -> list[tuple[str, str]]:
    trace = trace_training_step(Workload(model=model, inputs=inputs, blocks=blocks))
    return [(s.stage.kind, s.stage.module) for s in trace.stages]


def _items(model: nn.Module, container: str) -> list[tuple[str, str]]:
    """The oracle: the container's items, as the model holds them."""
    found = dict(model.named_modules())[container]
    return [("block", f"{container}.{name}") for name, _ in found.named_children()]


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


class _Stack(nn.Module):
    """A stem, identical blocks in an nn.ModuleList called in a Python loop, a head."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(_Block(16) for _ in range(depth))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_a_module_list_of_identical_blocks_is_the_run_in_order() -> None:
    model = _Stack(depth=5)
    assert _stages(model, torch.randn(4, 6)) == [
        ("prefix", ""), *_items(model, "blocks"), ("suffix", "")]


class _Attention(nn.Module):
    """A decoder layer as Hugging Face writes one: the hidden states first, then a mask and the
    rotary tables every layer receives, as positional and keyword arguments."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, *,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = position_embeddings
        q, k, v = self.qkv(self.norm(hidden)).chunk(3, dim=-1)
        q, k = q * cos + q.flip(-1) * sin, k * cos + k.flip(-1) * sin
        scores = (q @ k.transpose(-1, -2)).masked_fill(mask, float("-inf")).softmax(-1)
        return hidden + self.out(scores @ v)


class _Decoder(nn.Module):
    def __init__(self, layers: int, width: int = 8, vocabulary: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.layers = nn.ModuleList(_Attention(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocabulary)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        length = ids.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool).triu(1)
        angles = torch.arange(length)[:, None] * torch.ones(hidden.shape[-1])
        rotary = (angles.cos(), angles.sin())
        for layer in self.layers:
            hidden = layer(hidden, mask, position_embeddings=rotary)
        return self.lm_head(self.norm(hidden))


def test_hugging_face_style_layers_with_a_mask_and_rotary_tables_are_the_run() -> None:
    model = _Decoder(layers=4)
    ids = torch.randint(0, 11, (2, 5))
    assert _stages(model, ids) == [("prefix", ""), *_items(model, "layers"), ("suffix", "")]


class _Stages(nn.Module):
    """Nested Sequentials of blocks that differ (a ResNet's stages): one flattened run."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)),
            nn.Sequential(nn.Linear(8, 16), nn.GELU()),
            nn.Linear(16, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).sum(-1)


def test_nested_sequentials_of_different_blocks_flatten_into_one_run() -> None:
    model = _Stages()
    leaves = [("block", name) for name, module in model.named_modules()
              if name.startswith("body.") and not isinstance(module, nn.Sequential)]
    kinds = _stages(model, torch.randn(3, 4))
    assert [s for s in kinds if s[0] == "block"] == leaves
    assert kinds[-1] == ("suffix", "")  # the sum after the blocks


def test_a_named_container_is_taken_and_a_missing_one_refused() -> None:
    model = _Stack(depth=3)
    assert _stages(model, torch.randn(2, 6), blocks="blocks")[1:-1] == _items(model, "blocks")
    with pytest.raises(UsageError, match=r"'head' is not an nn\.Sequential"):
        _stages(model, torch.randn(2, 6), blocks="head")


class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x).relu())


def test_a_model_without_containers_has_no_run_and_says_why() -> None:
    trace = trace_training_step(Workload(model=_Flat(), inputs=(torch.randn(2, 4),)))
    assert trace.stages == () and trace.chain is None
    assert "_Flat has none" in trace.blocks_note
