"""Users' models as the fuzzing test feeds them to the command line (``test_fuzz_cli.py``):
each factory is one shape of model that people train and plain PyTorch trains without fuss.
Written out as a file of the user's (``memprop --model corpus.py:NAME``)."""

import torch
import torch.nn.functional as F
from torch import nn

import memprop

WIDTH = 16


class LoRALinear(nn.Module):
    """A frozen base layer with a trainable low-rank adapter (LoRA)."""

    def __init__(self, width, rank=2):
        super().__init__()
        self.base = nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, width) * 0.01)
        self.b = nn.Parameter(torch.zeros(width, rank))

    def forward(self, x):
        return self.base(x) + x @ self.a.t() @ self.b.t()


def lora(batch_size, depth=3):
    torch.manual_seed(0)
    blocks = [nn.Sequential(LoRALinear(WIDTH), nn.GELU()) for _ in range(depth)]
    return nn.Sequential(*blocks), torch.randn(batch_size, WIDTH)


class TiedLM(nn.Module):
    """A language model whose output head is its embedding (tied weights)."""

    def __init__(self, vocab=32, depth=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, WIDTH)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
                                    for _ in range(depth))
        self.head = nn.Linear(WIDTH, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def tied(batch_size, depth=2):
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (batch_size, 8))
    return memprop.Workload(model=TiedLM(depth=depth), inputs=(ids,),
                            targets=torch.randint(0, 32, (batch_size, 8)),
                            loss_fn=lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten()))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
        self.cls, self.box = nn.Linear(WIDTH, 3), nn.Linear(WIDTH, 4)

    def forward(self, x):
        h = self.trunk(x)
        return {"logits": self.cls(h), "boxes": self.box(h)}


def dict_output(batch_size):
    torch.manual_seed(0)
    return TwoHeads(), torch.randn(batch_size, WIDTH)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(WIDTH, WIDTH, num_layers=2, batch_first=True)
        self.out = nn.Linear(WIDTH, 2)

    def forward(self, x):
        h, _ = self.gru(x)
        return self.out(h[:, -1])


def gru(batch_size):
    torch.manual_seed(0)
    return Recurrent(), torch.randn(batch_size, 6, WIDTH)


def encoder_decoder(batch_size):
    torch.manual_seed(0)
    model = nn.Transformer(d_model=WIDTH, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=32, dropout=0.0, batch_first=True)
    return model, (torch.randn(batch_size, 6, WIDTH), torch.randn(batch_size, 5, WIDTH))


class MixtureOfExperts(nn.Module):
    """Top-1 routing: each token goes to the expert its router picks (nonzero, index_add)."""

    def __init__(self, experts=4):
        super().__init__()
        self.router = nn.Linear(WIDTH, experts)
        self.experts = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(experts))

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            rows = (choice == index).nonzero().squeeze(-1)
            out = out.index_add(0, rows, expert(x[rows]))
        return out


def moe(batch_size):
    torch.manual_seed(0)
    return nn.Sequential(MixtureOfExperts(), nn.Linear(WIDTH, 2)), torch.randn(batch_size, WIDTH)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(3)])


def half(batch_size):
    return _mlp().half(), torch.randn(batch_size, WIDTH).half()


def double(batch_size):
    return _mlp().double(), torch.randn(batch_size, WIDTH, dtype=torch.float64)


def bfloat16(batch_size):
    return _mlp().to(torch.bfloat16), torch.randn(batch_size, WIDTH).to(torch.bfloat16)


def compiled(batch_size):
    return torch.compile(_mlp()), torch.randn(batch_size, WIDTH)


def batchnorm(batch_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2))
    return model, torch.randn(batch_size, 3, 8, 8)


class Keywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, WIDTH)
        self.layers = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, 32))

    def forward(self, input_ids, attention_mask):
        return self.layers(self.embed(input_ids) * attention_mask.unsqueeze(-1))


def keywords(batch_size):
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (batch_size, 8))
    return Keywords(), {"input_ids": ids, "attention_mask": torch.ones(batch_size, 8)}


def compiled_workload(batch_size):
    model = torch.compile(_mlp())
    return memprop.Workload(model=model, inputs=(torch.randn(batch_size, WIDTH),),
                            optimizer=torch.optim.AdamW(model.parameters()))
