"""``accumulate``: one device, the batch in ``M`` microbatches, gradients accumulated in place
across them, one optimizer step; with memprop's recomputation plan when the microbatch step
does not fit the budget alone."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

from memprop.distribute.strategies._replicated import replicated_candidate, replicated_rank
from memprop.distribute.strategy import BuiltRank, Candidate, Factory, Request, Strategy

__all__ = ["ACCUMULATE"]


class _Accumulate(Strategy):
    name = "accumulate"
    label = "one device"
    single_device = True
    predicted_as = "the ledger's trace of the microbatch step"

    def candidates(self, request: Request, counts: Sequence[int], *, alone: bool
                   ) -> tuple[list[Candidate], list[str]]:
        return [c for m in counts
                if (c := replicated_candidate(self.name, request, 1, m)) is not None], []

    def build_rank(self, factory: Factory, candidate: Candidate, rank: int
                   ) -> AbstractContextManager[BuiltRank]:
        return replicated_rank(factory, candidate, ddp=False)

    def family(self, candidate: Candidate) -> str:
        if candidate.microbatches > 1:
            return "microbatches"
        return "recompute" if candidate.plan is not None else "one device"


ACCUMULATE = _Accumulate()
