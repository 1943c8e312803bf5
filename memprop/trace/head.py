"""The head and the loss computed in chunks of tokens, never the whole logits at once.

A causal language model's last linear layer (its ``lm_head``) maps each token's hidden state to
one logit per word of the vocabulary, and its cross-entropy keeps the log-softmax of all of
them for the backward: at a vocabulary of 16k and a width of 64 the logits weigh 256 times the
hidden states, and with their log-softmax and their gradient they are the step's peak. In
chunks of tokens, each chunk's logits live only while that chunk's loss is summed; the backward
computes each chunk's logits again (one more forward of the head: the option's price) and makes
that chunk's gradients from them. Memory: one chunk's logits and softmax instead of the whole.

The loss is the unchunked one (HF's ``ForCausalLMLoss``: labels shifted by one, ``-100``
ignored, the mean over the tokens not ignored, or the sum over ``num_items_in_batch``); the
gradients are the same sums taken chunk by chunk, equal to the unchunked step's up to float
rounding (NOTE [ How close the chunked gradients are ]).

NOTE [ How the chunked head is installed ]
Hugging Face's causal LMs compute ``logits = self.lm_head(hidden)``, then
``self.loss_function(logits, labels, vocab_size=...)``. While :func:`chunked_head` is installed
and a training forward is given ``labels`` (a pre-hook on the model arms it), ``lm_head``
returns a zero view of the logits' shape (one element of storage) and remembers its input, and
``loss_function`` computes the loss from those hidden states in chunks
(:class:`_LinearCrossEntropy`). The output's ``logits`` are then that zero view: under the
option the step computes the loss, not the logits. A forward whose loss did not take that view
(a model that soft-caps or scales its logits before the loss) is refused when it returns, so the
option never runs where it would change the loss. Without labels, without gradients
(evaluation, generation), or under autocast, the head runs as it is: the backward's re-run of a
chunk would not run under the forward's autocast (a custom autograd Function's backward runs
outside it), so its logits, and its gradients, would not be the step's. Traced so, the option's
chain is the model's own and the planner never takes it (a tie keeps the model's own head).

NOTE [ How close the chunked gradients are ]
The loss sums the same per-token terms in another order (chunk by chunk); the head's weight
gradient is the sum of the chunks' products ``softmax_c^T hidden_c`` where the unchunked step
forms one product over all tokens. In float32 both are within a few units of rounding of the
exact sum. From the same parameters, every gradient is within ``STEP_GRADIENT_RTOL`` (1e-5) of
the largest magnitude of the unchunked one, and the loss within 1e-6 relative (measured on
GPT-2 and Llama, vocabulary 8,192, width 64: at most 6.6e-7). Later steps are not comparable
so: the optimizer carries each step's rounding into the next step's parameters, and AdamW's
update, divided by the gradient's own scale, amplifies it where a gradient is near 0 (GPT-2
with dropout, vocabulary 128: 1.4e-4 at the second step, 1.6e-4 at the third). A planned run
(``memprop.run.measure``) therefore compares the first step's gradients, within
``STEP_GRADIENT_RTOL``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from memprop.errors import UsageError

__all__ = ["IGNORE_INDEX", "MAX_CHUNKS", "STEP_GRADIENT_RTOL", "HeadRefusedError", "chunk_counts",
           "chunked_head", "head_of"]

IGNORE_INDEX = -100
"""The label HF's causal LM loss ignores (``ForCausalLMLoss``'s ``ignore_index``)."""
MAX_CHUNKS = 16
"""The most chunks the planner's head option takes (:func:`chunk_counts`): the logits are then a
sixteenth of the whole, and smaller matrix products slow the head more than they save."""
STEP_GRADIENT_RTOL = 1e-5
"""One step's chunked gradients against the unchunked step's from the same parameters, in units
of each tensor's largest unchunked magnitude (NOTE [ How close the chunked gradients are ])."""


class HeadRefusedError(UsageError):
    """The head option was installed on a model whose forward did not compute its loss from
    ``lm_head``'s output (NOTE [ How the chunked head is installed ])."""


def head_of(model: nn.Module) -> nn.Linear | None:
    """The model's head, when the chunked option applies to it: a Hugging Face causal LM whose
    ``lm_head`` is a linear layer and whose loss is HF's own causal LM loss."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or "forward" in vars(head):
        return None
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:
        return None
    if getattr(model, "loss_function", None) is not LOSS_MAPPING.get("ForCausalLM"):
        return None
    return head


def chunk_counts(tokens: int) -> tuple[int, ...]:
    """The chunk counts the planner prices for the head option, fewest first: 2, 4, 8... up to
    ``MAX_CHUNKS`` and at most one chunk per token (1 for a single token). More chunks hold less
    of the logits at once, and each costs one more pass over the head's weight and its
    gradient (``memprop.plan.chain``'s NOTE [ The head option ]): the planner takes the count of
    least compute under the budget."""
    counts = []
    chunks = 2
    while chunks <= min(MAX_CHUNKS, tokens):
        counts.append(chunks)
        chunks *= 2
    return tuple(counts) or (1,)


def _row_slices(tokens: int, chunks: int) -> list[slice]:
    size = max(1, math.ceil(tokens / chunks))
    return [slice(start, min(tokens, start + size)) for start in range(0, tokens, size)]


class _LinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(linear(hidden, weight, bias).float(), labels, reduction="sum") /
    divisor``, chunk by chunk over the tokens; the backward computes each chunk's logits again."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, labels: torch.Tensor, divisor: torch.Tensor,
                chunks: int) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        slices = _row_slices(hidden.shape[0], chunks)
        for rows in slices:
            logits = F.linear(hidden[rows], weight, bias).float()
            total += F.cross_entropy(logits, labels[rows], ignore_index=IGNORE_INDEX,
                                     reduction="sum")
            del logits
        ctx.save_for_backward(hidden, weight, bias, labels, divisor)
        ctx.slices = slices
        return total / divisor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        hidden, weight, bias, labels, divisor = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        scale = grad / divisor
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if bias is not None and needs_bias else None
        for rows in ctx.slices:
            x, y = hidden[rows], labels[rows]
            logits = F.linear(x, weight, bias).float()
            probs = torch.softmax(logits, dim=-1)
            del logits
            valid = y != IGNORE_INDEX
            picked = torch.where(valid, y, 0)
            # d(sum of -log softmax[y]) / d logits = softmax - onehot(y), for tokens not ignored
            probs[torch.arange(probs.shape[0], device=probs.device), picked] -= 1
            probs *= (valid * scale).unsqueeze(1)
            chunk_grad = probs.to(weight.dtype)
            del probs
            if grad_hidden is not None:
                torch.mm(chunk_grad, weight, out=grad_hidden[rows])
            if grad_weight is not None:  # out=, not addmm_: FLOP counters know addmm's out
                torch.addmm(grad_weight, chunk_grad.t(), x, out=grad_weight)
            if grad_bias is not None:
                grad_bias += chunk_grad.sum(0)
            del chunk_grad
        return grad_hidden, grad_weight, grad_bias, None, None, None


@dataclass(kw_only=True, slots=True)
class _Installed:
    """The head option on one model, between its forward's pre-hook and its return."""

    head: nn.Linear
    chunks: int
    armed: bool = False
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    """The zero view ``lm_head`` returned in place of the logits."""
    used: bool = False


def _armed(state: _Installed, module: nn.Module, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> None:
    state.armed = (torch.is_grad_enabled() and kwargs.get("labels") is not None
                   and not torch.is_autocast_enabled(state.head.weight.device.type))
    state.hidden = state.logits = None
    state.used = False


def _returned(state: _Installed, module: nn.Module, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: Any) -> None:
    armed, used = state.armed, state.used
    state.armed, state.hidden = False, None
    if armed and state.logits is not None and not used:
        raise HeadRefusedError(
            f"the chunked head was installed on {type(module).__name__}, but its loss was not "
            "computed from lm_head's output (the forward changed the logits first, or computed "
            "no loss): plan this model without the head option (head_chunks=0)")


def _head_forward(state: _Installed, hidden: torch.Tensor) -> Any:
    head = state.head
    if not state.armed:
        return F.linear(hidden, head.weight, head.bias)
    state.hidden = hidden
    state.logits = hidden.new_zeros((), dtype=head.weight.dtype).expand(
        *hidden.shape[:-1], head.out_features)
    return state.logits


def _chunked_loss(state: _Installed, own: Any, logits: torch.Tensor, labels: torch.Tensor,
                  vocab_size: int, num_items_in_batch: Any = None,
                  ignore_index: int = IGNORE_INDEX, shift_labels: Any = None,
                  **kwargs: Any) -> torch.Tensor:
    hidden = state.hidden
    if hidden is None or logits is not state.logits or ignore_index != IGNORE_INDEX:
        loss: torch.Tensor = own(logits, labels, vocab_size,
                                 num_items_in_batch=num_items_in_batch,
                                 ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        return loss
    if shift_labels is None:  # as ForCausalLMLoss shifts them: token t predicts t + 1
        padded = F.pad(labels, (0, 1), value=IGNORE_INDEX)
        shift_labels = padded[..., 1:].contiguous()
    flat_labels = shift_labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        divisor = (flat_labels != IGNORE_INDEX).sum().float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    state.used = True
    head = state.head
    chunked: torch.Tensor = _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, flat_labels, divisor,
        state.chunks)
    return chunked


@contextlib.contextmanager
def chunked_head(model: nn.Module, chunks: int) -> Iterator[None]:
    """Run ``model``'s head and loss in ``chunks`` chunks of tokens while the block lasts (NOTE
    [ How the chunked head is installed ]); ``chunks`` 0 changes nothing."""
    if chunks <= 0:
        yield
        return
    head = head_of(model)
    if head is None:
        raise UsageError(
            f"the head option needs a Hugging Face causal LM (a linear lm_head and HF's causal "
            f"LM loss); {type(model).__name__} is not one: use head_chunks=0")
    state = _Installed(head=head, chunks=chunks)
    own_loss = vars(model).get("_loss_function")
    loss_was_set = "_loss_function" in vars(model)
    handles = [
        model.register_forward_pre_hook(functools.partial(_armed, state), with_kwargs=True),
        model.register_forward_hook(functools.partial(_returned, state), with_kwargs=True),
    ]
    head.forward = functools.partial(_head_forward, state)  # type: ignore[method-assign]
    _set_loss(model, functools.partial(_chunked_loss, state, model.loss_function))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        del head.forward
        if loss_was_set:
            _set_loss(model, own_loss)
        else:
            delattr(model, "_loss_function")


def _set_loss(model: Any, loss: Any) -> None:
    """HF's ``loss_function`` is a property whose setter keeps the value as ``_loss_function``
    (typed ``Any``: ``nn.Module``'s attribute type does not take a function)."""
    model.loss_function = loss
