"""Small models of the kinds the ledger must get right, shared by the tests and the benchmark.

Each factory takes ``batch_size`` (and builds everything from a fixed seed), so real and fake
builds are the same model; each returns a ``memprop.Workload``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from memprop.workload import Workload


def relu_mlp(batch_size: int = 8, depth: int = 3) -> Workload:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 5))
    x, y = torch.randn(batch_size, 32), torch.randint(0, 5, (batch_size,))
    return Workload(model=model, inputs=(x,), targets=y, loss_fn=F.cross_entropy,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1), name="relu-mlp",
                    batch_size=batch_size)


def gelu_mlp(batch_size: int = 8) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 40), nn.GELU(),
                          nn.Linear(40, 3))
    x = torch.randn(batch_size, 24)
    return Workload(model=model, inputs=(x,), optimizer=torch.optim.Adam(model.parameters()),
                    name="gelu-mlp", batch_size=batch_size)


def conv_bn(batch_size: int = 4) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    x, y = torch.randn(batch_size, 3, 12, 12), torch.randint(0, 10, (batch_size,))
    return Workload(model=model, inputs=(x,), targets=y, loss_fn=F.cross_entropy,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                    name="conv-bn", batch_size=batch_size)


def transformer(batch_size: int = 4) -> Workload:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.1,
                                       batch_first=True)
    model = nn.Sequential(layer)
    x = torch.randn(batch_size, 6, 32)
    return Workload(model=model, inputs=(x,), optimizer=torch.optim.AdamW(model.parameters()),
                    name="transformer", batch_size=batch_size)


class TiedLM(nn.Module):
    """An embedding whose weight is also the output projection, with an in-place op."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.embed(tokens))
        h.mul_(2.0)
        h = torch.tanh(h)
        return h @ self.embed.weight.t()


def tied_embeddings(batch_size: int = 4) -> Workload:
    torch.manual_seed(0)
    model = TiedLM()
    tokens = torch.randint(0, 50, (batch_size, 7))
    targets = torch.randint(0, 50, (batch_size * 7,))

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)

    return Workload(model=model, inputs=(tokens,), targets=targets, loss_fn=loss_fn,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1), name="tied",
                    batch_size=batch_size)


class Frozen(nn.Module):
    """A frozen first layer, a dropout, and a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.frozen(x))
        out = self.drop(self.head(h))
        return out, out.sum(dim=1)


def frozen_dropout_tuple(batch_size: int = 8) -> Workload:
    torch.manual_seed(0)
    model = Frozen()
    return Workload(model=model, inputs=(torch.randn(batch_size, 16),), name="frozen",
                    batch_size=batch_size)


ZOO = {
    "relu-mlp": relu_mlp,
    "gelu-mlp": gelu_mlp,
    "conv-bn": conv_bn,
    "transformer": transformer,
    "tied": tied_embeddings,
    "frozen": frozen_dropout_tuple,
}
