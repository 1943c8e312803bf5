"""The strategy contract's pieces that need no launch: ZeRO-1's partition against torch's own
(ZeroRedundancyOptimizer built under a fake process group), the registry's one check of a
strategy's name, and product code free of ``torch.testing``."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
import torch

from memprop.distribute import fsdp
from memprop.distribute.strategies import REGISTRY, chosen
from memprop.distribute.strategies.zero1 import shares
from memprop.errors import UsageError


def _torch_partition(sizes: list[int], world: int, rank: int) -> list[int]:
    """The element counts of the parameters torch's ZeroRedundancyOptimizer gives ``rank``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    parameters = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    with fsdp.fake_group(rank, world):
        zero = ZeroRedundancyOptimizer(parameters, optimizer_class=torch.optim.SGD, lr=0.1)
        return [p.numel() for group in zero.optim.param_groups for p in group["params"]]


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_zero1_shares_are_torchs_own_partition(world: int) -> None:
    # Ties (equal sizes), a few large and many small, and more ranks than parameters.
    draw = random.Random(world)
    for sizes in ([8, 8, 8, 8, 3], [draw.choice([1, 4, 64, 256, 4096]) for _ in range(13)],
                  [5, 2][:world - 1]):
        assigned = shares(sizes, world)
        for rank in range(world):
            assert [sizes[i] for i in assigned[rank]] == _torch_partition(sizes, world, rank), \
                (sizes, world, rank)


def test_one_check_of_a_strategys_name_in_the_registrys_order() -> None:
    assert [s.name for s in chosen(["pipeline", "accumulate"], "x")] == ["accumulate",
                                                                         "pipeline"]
    for bad in (["zero"], [], ["ddp", "fsdp2"]):
        with pytest.raises(UsageError, match=r"^--strategy S: choose among accumulate, ddp, "
                                             r"zero1, fsdp, pipeline$"):
            chosen(bad, "--strategy S")
    assert set(REGISTRY) == {"accumulate", "ddp", "zero1", "fsdp", "pipeline"}


def test_product_code_imports_nothing_from_torch_testing() -> None:
    # torch.testing._internal is torch's test suite, not an API: memprop's fake process group
    # is torch's public Backend.FAKE.
    package = Path(__file__).resolve().parents[2] / "memprop"
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.startswith("torch.testing")]
    assert not found
