"""``zero1``: DDP with the optimizer's state sharded (ZeRO stage 1,
``torch.distributed.optim.ZeroRedundancyOptimizer``): every rank keeps the whole model, its
gradients and DDP's buckets, and the optimizer's state of its share of the parameters only; it
steps its share, then every rank broadcasts its share's new values to the others.

NOTE [ What a ZeRO-1 rank holds ]
A rank's step is DDP's (NOTE [ What each rank holds ] in ``memprop.distribute``) with the
optimizer remade over the rank's share: torch's ZeroRedundancyOptimizer assigns the
parameters, largest first (a stable sort by element count), each to the rank holding the
fewest elements so far (the lowest such rank on a tie), which :func:`shares` does again. So a
rank's prediction is the chain of the single-device step of its microbatch with its share's
optimizer (its state, its step's temporaries), plus DDP's buckets. The broadcasts write into
the parameters in place: nothing more is held. Ranks holding shares of the same shapes run the
same step: one is traced for each. Measured against the allocator's own count on gloo ranks
(``tests/integration/test_fsdp_truth.py``).

Known limitations: no recomputation plan (a rank that does not fit is not planned; FSDP2 or
DDP with a plan may fit where it does not); the optimizer's parameter groups become one group
with its defaults (as a pipeline's stages remake it), which changes no memory.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

import torch

from memprop.distribute.strategies._replicated import replicated_rank
from memprop.distribute.strategy import (
    BuiltRank,
    Candidate,
    Factory,
    Rank,
    Request,
    Strategy,
    bucket_bytes,
    bucket_copies_s,
)
from memprop.workload import Workload

__all__ = ["ZERO1", "shares"]


def shares(sizes: Sequence[int], ranks: int) -> list[list[int]]:
    """Which parameters (indices into ``sizes``, their element counts) each rank steps:
    ZeroRedundancyOptimizer's sorted-greedy partition (NOTE [ What a ZeRO-1 rank holds ]),
    each rank's in the order it assigns them."""
    held = [0] * ranks
    assigned: list[list[int]] = [[] for _ in range(ranks)]
    for index in sorted(range(len(sizes)), key=lambda i: sizes[i], reverse=True):
        rank = held.index(min(held))
        assigned[rank].append(index)
        held[rank] += sizes[index]
    return assigned


class _RankShare(torch.optim.Optimizer):
    """What a rank's ZeroRedundancyOptimizer does to memory, for the trace: its parameter
    groups are every parameter (``zero_grad`` frees every gradient), its local optimizer the
    workload's remade over the rank's share, whose state is its state."""

    def __init__(self, parameters: list[torch.nn.Parameter],
                 local: torch.optim.Optimizer | None) -> None:
        super().__init__(parameters, {})
        self.local = local
        if local is not None:
            self.state = local.state

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if self.local is not None:
            self.local.step()


def _rank_optimizer(indices: list[int], workload: Workload) -> _RankShare:
    """The optimizer of the rank that steps the parameters at ``indices`` (its share, in the
    order ZeroRedundancyOptimizer gives them)."""
    from memprop.loop import remade_optimizer

    stepped = _stepped(workload)
    share = [stepped[i] for i in indices]
    return _RankShare(stepped, remade_optimizer(workload, share) if share else None)


def _stepped(workload: Workload) -> list[torch.nn.Parameter]:
    """The parameters the workload's optimizer steps, in its order."""
    assert workload.optimizer is not None
    return [p for group in workload.optimizer.param_groups for p in group["params"]]


class _Zero1(Strategy):
    name = "zero1"
    label = "ZeRO-1"
    predicted_as = "DDP's, with the optimizer's state of the rank's share"

    def candidates(self, request: Request, counts: Sequence[int], *, alone: bool
                   ) -> tuple[list[Candidate], list[str]]:
        if request.devices < 2:
            return [], []
        micro = next((size for m in counts if (size := request.split(m)) is not None), None)
        if micro is not None:
            workload, _ = request.chain(micro)
            if why := _why_not(workload):
                if alone:
                    from memprop.errors import UsageError

                    raise UsageError(f"no ZeRO-1 candidates: {why}")
                return [], [f"no ZeRO-1 candidates: {why}"]
        return [c for m in counts if (c := self._candidate(request, m)) is not None], []

    def _candidate(self, request: Request, microbatches: int) -> Candidate | None:
        """Each kind of rank's chain traced with its share's optimizer (NOTE [ What a ZeRO-1
        rank holds ]); the step: DDP's, with the optimizer's step over the largest share and
        the broadcasts of every share priced as an all-gather of the parameters."""
        from memprop.plan.schedule import flat, simulate

        devices = request.devices
        micro = request.split(microbatches)
        if micro is None:
            return None
        accumulating = microbatches > 1
        workload, chain = request.chain(micro, set_to_none=not accumulating)
        parameters = _stepped(workload)
        sizes = [p.numel() for p in parameters]
        assigned = shares(sizes, devices)
        kinds: dict[tuple[tuple[tuple[int, ...], torch.dtype], ...], list[int]] = {}
        for rank, share in enumerate(assigned):
            kinds.setdefault(tuple((tuple(parameters[i].shape), parameters[i].dtype)
                                   for i in share), []).append(rank)
        buckets = bucket_bytes(workload)
        peaks = [0] * devices
        for ranks in kinds.values():
            _, own = request.chain(micro, set_to_none=not accumulating,
                                   optimizer=functools.partial(_rank_optimizer,
                                                               assigned[ranks[0]]))
            for rank in ranks:
                peaks[rank] = simulate(own, flat(len(own))).peak_bytes + buckets
        largest = max(sum(sizes[i] for i in share) for share in assigned) / max(1, sum(sizes))
        compute = simulate(chain, flat(len(chain))).compute
        parameter_bytes = sum(p.numel() * p.element_size() for p in parameters)
        comm = request.comm
        step_s = (request.microbatches_s(micro, microbatches, compute) - request.optimizer_s()
                  + request.optimizer_s(largest) + comm.allreduce_s(buckets)
                  + bucket_copies_s(buckets) + comm.allgather_s(parameter_bytes))
        return Candidate(
            strategy=self.name, devices=devices, microbatches=microbatches,
            microbatch_size=micro, fits=request.fits(max(peaks)), predicted_step_s=step_s,
            ranks=tuple(Rank(rank=r, predicted_peak_bytes=p) for r, p in enumerate(peaks)),
            least_budget_bytes=max(peaks))

    def build_rank(self, factory: Factory, candidate: Candidate, rank: int
                   ) -> AbstractContextManager[BuiltRank]:
        return replicated_rank(factory, candidate, ddp=True, optimizer=zero_optimizer)


def zero_optimizer(workload: Workload) -> Any:
    """torch's ZeroRedundancyOptimizer over the workload optimizer's parameters on the
    default group, its local optimizer the workload's remade (``remade_optimizer``)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from memprop.loop import remade_optimizer

    return ZeroRedundancyOptimizer(
        _stepped(workload),
        optimizer_class=cast(Any, lambda groups: remade_optimizer(workload, groups)))


def _why_not(workload: Workload) -> str:
    """Why ZeroRedundancyOptimizer cannot shard this workload's optimizer, or empty."""
    if workload.optimizer is None:
        return "the workload has no optimizer, whose state ZeRO-1 shards"
    kinds = {(p.dtype, p.device.type) for p in _stepped(workload)}
    if len(kinds) > 1:
        return ("ZeroRedundancyOptimizer needs every parameter of one dtype and device; "
                f"these have {len(kinds)}")
    return ""


ZERO1 = _Zero1()
