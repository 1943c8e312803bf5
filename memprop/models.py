"""The seed's network, the workload memprop runs when the user names none.

Depth 1 is exactly the seed's model: ``z = W1 x``, ``h = φ(z)``, ``o = W2 h``, ``L = l(o, y)``,
``s = λ/2 (‖W1‖² + ‖W2‖²)``, ``J = L + s``. Deeper models repeat the hidden layer. The L2 term is
part of the graph (as in the seed), not optimizer weight decay, so its cost shows in the trace.

Each layer is one stage of the chain the planner sees: ``SeedMLP.layers`` is an ``nn.Sequential``
of ``depth`` hidden layers (linear then φ) and one output layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ACTIVATIONS", "HiddenLayer", "SeedMLP", "seed_objective"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class HiddenLayer(nn.Module):
    """``h = φ(W x + b)``: one hidden layer of the seed's network."""

    def __init__(
        self, in_features: int, out_features: int, *, activation: str, bias: bool, **factory: Any
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias, **factory)
        self.activation = activation
        self._phi = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._phi(self.linear(x))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class SeedMLP(nn.Module):
    """The seed's MLP: ``depth`` hidden layers of width ``hidden``, then ``classes`` outputs."""

    def __init__(
        self,
        *,
        input_dim: int = 784,
        hidden: int = 1024,
        classes: int = 10,
        depth: int = 1,
        activation: str = "relu",
        bias: bool = False,
        weight_decay: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r}: choose one of {sorted(ACTIVATIONS)}")
        if min(input_dim, hidden, classes, depth) < 1:
            raise ValueError("input_dim, hidden, classes and depth must all be at least 1")
        widths = [input_dim] + [hidden] * depth
        layers: list[nn.Module] = [
            HiddenLayer(w_in, w_out, activation=activation, bias=bias, **factory)
            for w_in, w_out in itertools.pairwise(widths)
        ]
        layers.append(nn.Linear(hidden, classes, bias=bias, **factory))
        self.layers = nn.Sequential(*layers)
        self.weight_decay = weight_decay
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out

    def weights(self) -> list[torch.Tensor]:
        """The weight matrices W1..W(depth+1), the terms of the seed's regulariser."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Linear)]


def seed_objective(model: SeedMLP) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``J = L + s``: cross-entropy plus ``λ/2 Σ‖W‖²_F`` (the seed regularises weights only)."""

    def objective(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(output, targets)
        if model.weight_decay == 0.0:
            return loss
        penalty = sum(w.pow(2).sum() for w in model.weights())
        return loss + (model.weight_decay / 2) * penalty

    return objective
