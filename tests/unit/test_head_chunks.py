"""The chunked linear cross-entropy of the head option (``memprop.trace.head``) against torch's
own ``cross_entropy(linear(...).float())`` over the whole logits, as HF's causal LM loss computes
it: with a bias, ignored labels, both reductions, chunk counts that do not divide the tokens."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from memprop.trace.head import (
    IGNORE_INDEX,
    MAX_CHUNKS,
    STEP_GRADIENT_RTOL,
    _LinearCrossEntropy,
    chunk_counts,
)


def _leaves(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(37, 8, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=generator)
    labels[::5] = IGNORE_INDEX
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunks", [1, 2, 7, 37, 100])
@pytest.mark.parametrize("items", [None, 64.0])
def test_chunked_loss_and_gradients_equal_torchs_over_the_whole_logits(
        chunks: int, items: float | None) -> None:
    """Oracle: F.cross_entropy over F.linear's whole logits (mean over the labels not ignored,
    or the sum over ``num_items_in_batch``), its loss and its gradients by autograd: the loss
    within 1e-6 relative, each gradient within STEP_GRADIENT_RTOL of its largest magnitude
    (float32 sums in another order)."""
    hidden, weight, bias, labels = _leaves(chunks)
    logits = F.linear(hidden, weight, bias)
    if items is None:
        own = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        divisor = (labels != IGNORE_INDEX).sum().float()
    else:
        own = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / items
        divisor = torch.tensor(items)
    expected = torch.autograd.grad(3.0 * own, (hidden, weight, bias))
    loss = _LinearCrossEntropy.apply(hidden, weight, bias, labels, divisor, chunks)
    got = torch.autograd.grad(3.0 * loss, (hidden, weight, bias))
    assert abs(loss - own) <= 1e-6 * abs(own)
    for g, e in zip(got, expected, strict=True):
        assert (g - e).abs().max() <= STEP_GRADIENT_RTOL * e.abs().max()


def test_the_chunk_counts_priced_are_powers_of_two_within_the_tokens_and_the_bound() -> None:
    """The counts, computed by hand: 2, 4, 8... up to MAX_CHUNKS; at most one chunk per token;
    a single token in one chunk."""
    assert chunk_counts(tokens=1024) == (2, 4, 8, 16) and MAX_CHUNKS == 16
    assert chunk_counts(tokens=5) == (2, 4)
    assert chunk_counts(tokens=1) == (1,)
