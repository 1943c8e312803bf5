"""The registry: every strategy ``memprop.distribute`` can choose, in the order their
candidates are listed (NOTE [ One contract for a strategy ] in
``memprop.distribute.strategy``). A new strategy is a module here and one line below."""

from __future__ import annotations

from collections.abc import Sequence

from memprop.distribute.strategies.accumulate import ACCUMULATE
from memprop.distribute.strategies.ddp import DDP
from memprop.distribute.strategies.fsdp import FSDP
from memprop.distribute.strategies.pipeline import PIPELINE
from memprop.distribute.strategies.zero1 import ZERO1
from memprop.distribute.strategy import Candidate, Strategy
from memprop.errors import UsageError

__all__ = ["DEFAULT_STRATEGIES", "REGISTRY", "chosen", "strategy_of"]

REGISTRY: dict[str, Strategy] = {s.name: s for s in (ACCUMULATE, DDP, ZERO1, FSDP, PIPELINE)}
DEFAULT_STRATEGIES = ("accumulate", "ddp", "fsdp", "pipeline")
"""What ``memprop distribute`` weighs unless told: ZeRO-1 is asked for by name."""


def chosen(names: Sequence[str], given: str) -> list[Strategy]:
    """The registered strategies ``names`` asks for, in the registry's order: the one check of
    a strategy's name (``given``: how the user wrote them, for the message)."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        raise UsageError(f"{given}: choose among {', '.join(REGISTRY)}")
    return [s for name, s in REGISTRY.items() if name in names]


def strategy_of(candidate: Candidate) -> Strategy:
    return REGISTRY[candidate.strategy]
