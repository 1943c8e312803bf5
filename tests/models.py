"""The models people train, from small configurations, for the tests (and the benchmark builds
bigger ones the same way): Hugging Face GPT-2, Llama and BERT (random init, no downloads), and
torchvision-style ResNets and a ViT written here, since torchvision's wheel on this registry
does not load against the CPU torch. Each factory takes ``batch_size`` and returns a
``memprop.Workload`` with AdamW, built from a fixed seed, so that two calls build the same
model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from memprop.workload import Workload
from memprop.zoo import BasicBlock, Bottleneck, ResNet, VisionTransformer

__all__ = [
    "HF_MODELS",
    "MODELS",
    "TORCHVISION_STYLE",
    "bert",
    "gpt2",
    "llama",
    "resnet18",
    "resnet50",
    "vit",
]


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


# -- Hugging Face transformers ------------------------------------------------------------------

def _hf(build: Callable[[Any], nn.Module], name: str, batch_size: int, tokens: int
        ) -> Workload:
    """``build(transformers)``, random init (a vocabulary of 128), on a batch of token ids that
    are also the labels."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = build(transformers)
    ids = torch.randint(0, 128, (batch_size, tokens), generator=torch.Generator().manual_seed(1))
    return Workload(model=model, inputs=(), keywords={"input_ids": ids, "labels": ids},
                    optimizer=_adamw(model), name=name, batch_size=batch_size)


def gpt2(batch_size: int = 4, *, layers: int = 4, width: int = 64, tokens: int = 32) -> Workload:
    return _hf(lambda t: t.GPT2LMHeadModel(t.GPT2Config(
        n_layer=layers, n_embd=width, n_head=4, vocab_size=128, n_positions=max(64, tokens),
        bos_token_id=0, eos_token_id=0)), "gpt2", batch_size, tokens)


def llama(batch_size: int = 4, *, layers: int = 4, width: int = 64, tokens: int = 32) -> Workload:
    return _hf(lambda t: t.LlamaForCausalLM(t.LlamaConfig(
        num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        max_position_embeddings=max(64, tokens), bos_token_id=0, eos_token_id=0)),
        "llama", batch_size, tokens)


def bert(batch_size: int = 4, *, layers: int = 4, width: int = 64, tokens: int = 32) -> Workload:
    return _hf(lambda t: t.BertForMaskedLM(t.BertConfig(
        num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width,
        num_attention_heads=4, vocab_size=128, max_position_embeddings=max(64, tokens))),
        "bert", batch_size, tokens)


# -- torchvision-style ResNets ------------------------------------------------------------------

def _images(batch_size: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch_size, 3, size, size, generator=generator),
            torch.randint(0, 10, (batch_size,), generator=generator))


def resnet18(batch_size: int = 4, *, width: int = 8, size: int = 32) -> Workload:
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [2, 2, 2, 2], width=width)
    images, labels = _images(batch_size, size)
    return Workload(model=model, inputs=(images,), targets=labels, loss_fn=F.cross_entropy,
                    optimizer=_adamw(model), name="resnet18", batch_size=batch_size)


def resnet50(batch_size: int = 4, *, width: int = 8, size: int = 32) -> Workload:
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [3, 4, 6, 3], width=width)
    images, labels = _images(batch_size, size)
    return Workload(model=model, inputs=(images,), targets=labels, loss_fn=F.cross_entropy,
                    optimizer=_adamw(model), name="resnet50", batch_size=batch_size)


def vit(batch_size: int = 4, *, layers: int = 4, width: int = 64, size: int = 32) -> Workload:
    torch.manual_seed(0)
    model = VisionTransformer(size=size, layers=layers, width=width, mlp=2 * width)
    images, labels = _images(batch_size, size)
    return Workload(model=model, inputs=(images,), targets=labels, loss_fn=F.cross_entropy,
                    optimizer=_adamw(model), name="vit", batch_size=batch_size)


HF_MODELS: dict[str, Callable[..., Workload]] = {"gpt2": gpt2, "llama": llama, "bert": bert}
TORCHVISION_STYLE: dict[str, Callable[..., Workload]] = {
    "resnet18": resnet18, "resnet50": resnet50, "vit": vit}
MODELS: dict[str, Callable[..., Workload]] = {**HF_MODELS, **TORCHVISION_STYLE}
"""Every model above, by name: with dropout (GPT-2, BERT, ViT) and BatchNorm (the ResNets)."""
