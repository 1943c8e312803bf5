"""The models people train, from small configurations, for the tests (and the benchmark builds
bigger ones the same way): Hugging Face GPT-2, Llama and BERT (random init, no downloads), and
torchvision-style ResNets and a ViT written here, since torchvision's wheel on this registry
does not load against the CPU torch. Each factory takes ``batch_size`` and returns a
``memprop.Workload`` with AdamW, built from a fixed seed, so that two calls build the same
model."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from memprop.workload import Workload

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

def _hf_batch(vocab: int, batch_size: int, tokens: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch_size, tokens), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def gpt2(batch_size: int = 4, *, layers: int = 4, width: int = 64, tokens: int = 32) -> Workload:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=128,
                                     n_positions=max(64, tokens), bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    return Workload(model=model, inputs=(), keywords=_hf_batch(128, batch_size, tokens),
                    optimizer=_adamw(model), name="gpt2", batch_size=batch_size)


def llama(batch_size: int = 4, *, layers: int = 4, width: int = 64, tokens: int = 32) -> Workload:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        max_position_embeddings=max(64, tokens), bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    return Workload(model=model, inputs=(), keywords=_hf_batch(128, batch_size, tokens),
                    optimizer=_adamw(model), name="llama", batch_size=batch_size)


def bert(batch_size: int = 4, *, layers: int = 4, width: int = 64, tokens: int = 32) -> Workload:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width,
        num_attention_heads=4, vocab_size=128, max_position_embeddings=max(64, tokens))
    model = transformers.BertForMaskedLM(config)
    return Workload(model=model, inputs=(), keywords=_hf_batch(128, batch_size, tokens),
                    optimizer=_adamw(model), name="bert", batch_size=batch_size)


# -- torchvision-style ResNets ------------------------------------------------------------------

class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convolutions and a shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck: 1x1, 3x3, 1x1 convolutions and a shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet: a stem, four nn.Sequential layers of blocks, pooling and a head."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], *,
                 width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, width, layers[0])
        self.layer2 = self._layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * block.expansion, classes)

    def _layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
               stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


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


# -- a torchvision-style ViT --------------------------------------------------------------------

class EncoderBlock(nn.Module):
    """torchvision's ViT EncoderBlock: pre-norm attention and MLP, each with a residual."""

    def __init__(self, width: int, heads: int, mlp: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp, width), nn.Dropout(dropout))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(inputs)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + inputs
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, tokens: int, layers: int, width: int, heads: int, mlp: int,
                 dropout: float) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, tokens, width).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(width, heads, mlp, dropout))
            for i in range(layers)))
        self.ln = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """torchvision's VisionTransformer: patch projection, a class token, an Encoder, a head."""

    def __init__(self, *, size: int = 32, patch: int = 8, layers: int = 4, width: int = 64,
                 heads: int = 4, mlp: int = 128, dropout: float = 0.1, classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        self.conv_proj = nn.Conv2d(3, width, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.encoder = Encoder((size // patch) ** 2 + 1, layers, width, heads, mlp, dropout)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(width, classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


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
