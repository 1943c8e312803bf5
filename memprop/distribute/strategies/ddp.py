"""``ddp``: ``N`` ranks, each with ``batch / N`` in ``M`` microbatches (``no_sync`` until the
last), ``DistributedDataParallel`` over them: a rank's peak is the single-device step's plus
DDP's gradient buckets (NOTE [ What each rank holds ] in ``memprop.distribute``)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

from memprop.distribute.strategies._replicated import replicated_candidate, replicated_rank
from memprop.distribute.strategy import BuiltRank, Candidate, Factory, Request, Strategy

__all__ = ["DDP"]


class _DDP(Strategy):
    name = "ddp"
    label = "DDP"
    predicted_as = "a microbatch step's trace plus the gradient buckets"

    def candidates(self, request: Request, counts: Sequence[int], *, alone: bool
                   ) -> tuple[list[Candidate], list[str]]:
        if request.devices < 2:
            return [], []
        return [c for m in counts if (c := replicated_candidate(
            self.name, request, request.devices, m)) is not None], []

    def build_rank(self, factory: Factory, candidate: Candidate, rank: int
                   ) -> AbstractContextManager[BuiltRank]:
        return replicated_rank(factory, candidate, ddp=True)


DDP = _DDP()
