"""What accumulation, DDP and ZeRO-1 share: every rank runs the single-device step of its
microbatch (NOTE [ What each rank holds ] in ``memprop.distribute``), predicted from its chain
and run through ``memprop.loop.accumulated_step``, DDP's gradient buckets noted by a
communication hook."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch

from memprop.distribute.strategy import (
    BuiltRank,
    Candidate,
    Factory,
    Rank,
    Request,
    bucket_bytes,
    bucket_copies_s,
)
from memprop.workload import Workload

__all__ = ["replicated_candidate", "replicated_rank"]


def replicated_candidate(strategy: str, request: Request, devices: int, microbatches: int
                         ) -> Candidate | None:
    """The step of ``batch / (devices x microbatches)`` samples on each of ``devices`` ranks,
    gradients accumulated over the microbatches, DDP's buckets on more than one rank; with
    memprop's recomputation plan when the budget needs one."""
    from memprop.plan.schedule import flat, simulate
    from memprop.plan.solvers import min_feasible_bytes, solve

    micro = request.split(microbatches, devices)
    if micro is None:
        return None
    # From the second microbatch on, the gradients accumulate in place: live through the
    # step, as a loop that zeroes them with set_to_none=False holds them.
    workload, chain = request.chain(micro, set_to_none=microbatches == 1)
    extra = bucket_bytes(workload) if devices > 1 else 0
    unplanned = simulate(chain, flat(len(chain)))
    least = min_feasible_bytes(chain)[0] + extra
    plan = None
    peak, compute = unplanned.peak_bytes + extra, unplanned.compute
    budget = request.budget_bytes
    if budget is not None and peak > budget and least <= budget:
        plan = solve(chain, budget - extra, "optimal")
        peak, compute = plan.peak_bytes + extra, plan.compute
    allreduce = request.comm.allreduce_s(extra) + bucket_copies_s(extra) if devices > 1 else 0.0
    return Candidate(
        strategy=strategy, devices=devices, microbatches=microbatches, microbatch_size=micro,
        fits=request.fits(peak),
        predicted_step_s=request.microbatches_s(micro, microbatches, compute) + allreduce,
        ranks=tuple(Rank(rank=r, predicted_peak_bytes=peak) for r in range(devices)),
        least_budget_bytes=least, plan=plan)


@contextlib.contextmanager
def replicated_rank(factory: Factory, candidate: Candidate, *, ddp: bool,
                    optimizer: Callable[[Workload], Any] | None = None) -> Iterator[BuiltRank]:
    """The candidate on this rank: the model under ``DistributedDataParallel`` when ``ddp``,
    the optimizer ``optimizer(workload)`` makes in place of the workload's when given (ZeRO-1's),
    the recomputation plan installed when there is one.

    DDP's gradient buckets exist before the step and are touched only in the backward, so a
    communication hook notes them during the first steps and they are put on the ledger with
    what else exists before the step."""
    from memprop.devices.allocator import step_state_tensors
    from memprop.distribute.launch import device_of
    from memprop.loop import accumulated_step
    from memprop.run.install import installed, without_caches
    from memprop.trace.ledger import Category, StorageLedger
    from memprop.trace.step import register_step_state

    torch.manual_seed(0)
    workload: Workload = factory(candidate.microbatch_size)
    model = workload.model
    buckets: list[torch.Tensor] = []
    stepped, quiet = workload, None
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        # The ranks are built alike (seeded, one factory): DDP's first broadcast of the
        # parameters would copy nothing new, through a flat buffer that gloo's thread frees
        # out of the allocator's sight.
        wrapped = DistributedDataParallel(model, init_sync=False)
        # A lambda: DDP checks a hook's annotations, which this module's are strings.
        wrapped.register_comm_hook(buckets, lambda state, bucket: _noting_allreduce(state,
                                                                                  bucket))
        stepped, quiet = dataclasses.replace(workload, model=wrapped), wrapped.no_sync
    holder = workload
    if optimizer is not None:
        stepped.optimizer = optimizer(workload)
        # The state is the local optimizer's (ZeRO keeps its rank's share there).
        holder = dataclasses.replace(workload, optimizer=getattr(stepped.optimizer, "optim",
                                                                 stepped.optimizer))

    def step() -> None:
        buckets.clear()  # DDP rebuilds its buckets after the first step: note this step's
        accumulated_step(stepped, candidate.microbatches, quiet=quiet)

    def ledger() -> StorageLedger:
        counted = StorageLedger()
        register_step_state(counted, holder, training=True)
        counted.register(buckets, Category.GRADIENTS, "DDP's gradient buckets")
        return counted

    plan = candidate.plan
    with contextlib.ExitStack() as stack:
        stack.enter_context(without_caches(model))
        if plan is not None:
            stack.enter_context(installed(model, plan.stage_names, plan.tree, plan.selective,
                                          plan.draws_random, head_chunks=plan.head_chunks))
        yield BuiltRank(step=step, loop=stepped, ledger=ledger,
                        held=lambda: [*step_state_tensors(holder), *buckets],
                        device=device_of(workload))


def _noting_allreduce(buckets: list[torch.Tensor], bucket: Any) -> Any:
    """DDP's own all-reduce (torch's ``allreduce_hook``), noting each bucket's buffer."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    if not any(b.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
               for b in buckets):
        buckets.append(buffer)
    return allreduce_hook(cast(Any, None), bucket)  # None: the default process group
