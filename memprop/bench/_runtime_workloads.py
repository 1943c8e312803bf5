"""The runtime benchmark's two workloads, built by name so that a subprocess (the torch.compile
contender) builds the very same model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from memprop.workload import SeedConfig, Workload, seed_workload

__all__ = ["CASES", "QUICK_CASES", "build"]


def _mlp(batch: int, *, width: int, depth: int) -> Workload:
    return seed_workload(SeedConfig(input_dim=width, hidden=width, classes=10, depth=depth,
                                    batch=batch))


def _transformer(batch: int, *, width: int, layers: int, tokens: int) -> Workload:
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # dropout=0.0: a plan's recomputation replays the RNG anyway, but torch.compile's
        # partitioner would then be comparing another graph.
        model = nn.Sequential(*[
            nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
            for _ in range(layers)
        ])
    inputs = torch.randn(batch, tokens, width, generator=generator)
    return Workload(model=model, inputs=(inputs,),
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                    name="transformer-stack", batch_size=batch, depth=layers)


# name -> (builder of batch, default batch, description). Sized so that an unplanned step takes
# about 50-150 ms on one core of this kind of machine (the benchmark runs on one thread).
CASES: dict[str, tuple[Callable[[int], Workload], int, str]] = {
    "mlp": (lambda b: _mlp(b, width=128, depth=16), 2048,
            "seed MLP, 16 hidden layers of width 128, batch 2048, SGD"),
    "transformer": (lambda b: _transformer(b, width=64, layers=8, tokens=64), 8,
                    "8 TransformerEncoderLayers, d_model 64, 4 heads, ffn 256, 64 tokens, "
                    "batch 8, SGD"),
}
QUICK_CASES: dict[str, tuple[Callable[[int], Workload], int, str]] = {
    "mlp": (lambda b: _mlp(b, width=32, depth=4), 16,
            "seed MLP, 4 hidden layers of width 32, batch 16, SGD"),
    "transformer": (lambda b: _transformer(b, width=16, layers=2, tokens=8), 4,
                    "2 TransformerEncoderLayers, d_model 16, 8 tokens, batch 4, SGD"),
}


def build(name: str, batch: int, *, quick: bool = False) -> Workload:
    builder = (QUICK_CASES if quick else CASES)[name][0]
    return builder(batch)
