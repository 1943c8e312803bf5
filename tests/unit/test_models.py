"""The seed's MLP against the seed's closed-form gradients (its backward-propagation section)."""

import math

import pytest
import torch
from torch.nn import functional as F

from memprop.models import SeedMLP, seed_objective

_PHI_PRIME = {
    "relu": lambda z: (z > 0).to(z.dtype),
    "tanh": lambda z: 1 - torch.tanh(z) ** 2,
    "sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
    "gelu": lambda z: (
        0.5 * (1 + torch.erf(z / 2**0.5)) + z * torch.exp(-(z**2) / 2) / (2 * torch.pi) ** 0.5
    ),
}
_PHI = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}


@pytest.mark.parametrize("activation", sorted(_PHI))
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_equal_the_seed_equations(activation: str, bias: bool) -> None:
    torch.manual_seed(0)
    lam, n, d, h, q = 0.3, 5, 4, 6, 3
    model = SeedMLP(input_dim=d, hidden=h, classes=q, depth=1, activation=activation, bias=bias,
                    weight_decay=lam, dtype=torch.float64)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, q, (n,))
    J = seed_objective(model)(model(x), y)
    J.backward()

    W1, W2 = model.layers[0].linear.weight, model.layers[1].weight
    b1 = model.layers[0].linear.bias if bias else torch.zeros(h, dtype=torch.float64)
    b2 = model.layers[1].bias if bias else torch.zeros(q, dtype=torch.float64)
    with torch.no_grad():
        z = x @ W1.T + b1                       # z = W1 x (+ b1), one row per example
        hh = _PHI[activation](z)                # h = φ(z)
        o = hh @ W2.T + b2                      # o = W2 h (+ b2)
        dJ_do = (torch.softmax(o, dim=1) - F.one_hot(y, q)) / n   # ∂L/∂o for mean cross-entropy
        dJ_dW2 = dJ_do.T @ hh + lam * W2        # ∂J/∂W2 = ∂J/∂o hᵀ + λ W2
        dJ_dh = dJ_do @ W2                      # ∂J/∂h = W2ᵀ ∂J/∂o
        dJ_dz = dJ_dh * _PHI_PRIME[activation](z)  # ∂J/∂z = ∂J/∂h ⊙ φ′(z)
        dJ_dW1 = dJ_dz.T @ x + lam * W1         # ∂J/∂W1 = ∂J/∂z xᵀ + λ W1
        dJ_dx = dJ_dz @ W1                      # ∂J/∂x = W1ᵀ ∂J/∂z
    torch.testing.assert_close(W2.grad, dJ_dW2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(W1.grad, dJ_dW1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, dJ_dx, rtol=1e-10, atol=1e-12)
    if bias:
        # Biases are not regularised (the seed's s covers the weights): ∂J/∂b = Σ_rows ∂J/∂z.
        torch.testing.assert_close(model.layers[1].bias.grad, dJ_do.sum(0), rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(model.layers[0].linear.bias.grad, dJ_dz.sum(0), rtol=1e-10,
                                   atol=1e-12)


def test_the_ledger_books_each_gradient_at_the_shape_of_what_it_is_taken_against() -> None:
    """Seed exercise 1: for scalar f of an n×m matrix X, ∂f/∂X is n×m. The oracle: each
    parameter's shape times its element size, summed by hand; memprop's ledger must book
    exactly that many bytes of gradients (no more: none doubled; no fewer: none missed)."""
    from memprop.trace.profile import profile

    model = SeedMLP(input_dim=7, hidden=5, classes=3, depth=3, bias=True)
    expected = sum(math.prod(p.shape) * p.element_size() for p in model.parameters())
    memory = profile(model, torch.randn(11, 7)).to_dict()["memory"]
    assert memory["gradients_bytes"] == expected
    assert memory["parameters_bytes"] == expected  # ∂J/∂W has W's shape and dtype


def test_depth_and_bias_build_the_layers() -> None:
    model = SeedMLP(input_dim=7, hidden=5, classes=3, depth=4, bias=True)
    assert len(model.layers) == 5
    assert [tuple(w.shape) for w in model.weights()] == [(5, 7), (5, 5), (5, 5), (5, 5), (3, 5)]
    assert sum(p.numel() for p in model.parameters()) == 7 * 5 + 3 * 25 + 15 + 4 * 5 + 3


def test_bad_activation_is_refused() -> None:
    with pytest.raises(ValueError, match="activation"):
        SeedMLP(activation="swish")
