"""FSDP2 (``torch.distributed.fsdp.fully_shard``): each of the model's blocks a unit, then the
root, as torchtitan and torch's own recipe shard a model; parameters, gradients and optimizer
state sharded across the ranks.

NOTE [ Predicting FSDP2 with a fake process group ]
What FSDP2 holds at a rank's peak (the unsharded parameters of the units in flight, the
all-gather and reduce-scatter buffers, prefetching, the sharded gradients and optimizer state)
is FSDP2's own bookkeeping, not a formula worth rewriting. So the prediction runs FSDP2 itself:
torch's ``fake`` process group (collectives that move nothing) with the rank's index and the
world's size, the model built on fake tensors (nothing allocated), a step to make the optimizer's
state, then the steady step under the ledger. Only the data of the collectives differ from a
real rank, and the storages they fill are allocated as on a real one. Two things make that true
(NOTE [ Sharded tensors and storages resized in place ] in ``memprop.trace.ledger``): a
DTensor's memory is its local shard, and FSDP2 allocates and frees the gathered parameters with
``UntypedStorage.resize_``, which the ledger sees, so they live only while FSDP2 holds them.

The backend's own memory is modelled for gloo (``backend="gloo"``, the CPU's): c10d's gloo
reduce-scatter works on a clone of its input, and its all-gather gathers into a flat buffer the
size of its output before copying out; each is counted live for the length of its call
(``_gloo_ledger``). The timing of gloo's worker thread is bounded, not modelled: the worker
lets go of a collective's tensors a moment after the caller's wait returns, and on a machine
whose cores the ranks share it can be late enough that an all-gather buffer or a clone is still
live when FSDP2 allocates again. The real peak then exceeds the prediction by up to a unit's
unsharded parameters (or gradients) per late collective; the prediction is the peak when gloo
keeps up. Measured against the allocator's own count (torch.profiler's memory events, every
rank, ``tests/integration/test_fsdp_truth.py``): within 1% on a residual LayerNorm MLP, a
small Llama, a conv net with BatchNorm (which also carries a kernel's scratch the ledger cannot
see, 36,992 B inside ``convolution_backward``) and the seed MLP, on 2 and 4 ranks, 1 to 8
microbatches, whenever gloo kept up; FSDPMemTracker, torch's own estimator, run on real ranks,
agrees with the allocator within 1%. Before the ledger saw shards and resizes, that residual
MLP on 2 ranks, 2 microbatches of 64, was predicted at 53,049,064 B; it is 26,819,864 B now, and
the allocator counts 26,819,904 B.

The fake group is the process's default group while a prediction runs, so a process already in
a distributed job (a default group initialised) cannot predict FSDP2; it says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from memprop.workload import Workload

__all__ = ["fake_group", "fake_rank", "local_state", "measured_peak", "rank_ledger",
           "rank_peak_bytes", "shard", "sharded_step", "unit_bytes", "why_not"]


def why_not() -> str:
    """Why FSDP2 cannot be predicted in this process, or empty."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this build of torch"
    if dist.is_initialized():
        return ("this process is already in a process group; FSDP2 is predicted with a fake "
                "one")
    return ""


@contextlib.contextmanager
def fake_group(rank: int, world: int) -> Iterator[Any]:
    """torch's fake process group as the default one, and a 1-D CPU device mesh over it.

    ``init_process_group`` with the ``fake`` backend (``Backend.FAKE``, public) and no store:
    torch makes the store and registers the backend itself (memprop imports nothing from
    ``torch.testing``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(dist.Backend.FAKE, rank=rank, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def shard(workload: Workload, blocks: Sequence[str], mesh: Any = None) -> None:
    """``fully_shard`` each block (qualified names), then the root; the workload's optimizer
    remade over the sharded parameters (FSDP2 replaces them with DTensors)."""
    from torch.distributed.fsdp import fully_shard

    from memprop.loop import remade_optimizer

    model = workload.model
    for name in blocks:
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    workload.optimizer = remade_optimizer(workload, list(model.parameters()))


def sharded_step(workload: Workload, microbatches: int) -> Callable[[], None]:
    """A training step of ``microbatches`` forward and backward passes of the rank's
    microbatch, the gradients reduce-scattered after each (FSDP2's default) and accumulated in
    their shards, one optimizer step (``memprop.loop.accumulated_step``: the gradients zeroed
    as the workload's loop does)."""
    from memprop.loop import accumulated_step

    def step() -> None:
        accumulated_step(workload, microbatches)

    return step


def local_state(workload: Workload) -> dict[str, list[torch.Tensor]]:
    """What a rank holds before the step, by ledger category: its shards of the parameters,
    of the gradients the loop keeps (``set_to_none=False``) and of the optimizer's state, and
    its inputs."""
    from memprop.loop import tensors_in

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    optimizer = workload.optimizer
    state = [] if optimizer is None else [
        local(t) for t in tensors_in(list(optimizer.state.values()))]
    inputs = list(workload.input_tensors)
    if workload.targets is not None:
        inputs.append(workload.targets)
    parameters = list(workload.model.parameters())
    return {"parameters": [local(p) for p in parameters],
            "gradients": [local(p.grad) for p in parameters if p.grad is not None],
            "buffers": list(workload.model.buffers()), "optimizer_state": state,
            "inputs": inputs}


def _gloo_ledger() -> Any:
    """A ledger that also counts gloo's copy of each reduce-scatter's input for the length of the
    call (NOTE [ Predicting FSDP2 with a fake process group ])."""
    from memprop.trace.ledger import StorageLedger

    # The argument each collective copies: a reduce-scatter's input (cloned), an all-gather's
    # output (gathered into a flat buffer, then copied out).
    copied_argument = {torch.ops.c10d._reduce_scatter_base_.default: 1,
                       torch.ops.c10d._allgather_base_.default: 0}

    class _GlooLedger(StorageLedger):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            position = copied_argument.get(func)
            if position is not None:
                copied = args[position]
                self.transient(copied.numel() * copied.element_size(), func, copied.device)
            return super().__torch_dispatch__(func, types, args, kwargs)

    return _GlooLedger()


def rank_ledger(workload: Workload, backend: str = "") -> Any:
    """A ledger holding what the rank holds before its step (``local_state``);
    ``backend="gloo"`` adds gloo's copies of the collectives' arguments."""
    from memprop.trace.ledger import Category, StorageLedger

    ledger = _gloo_ledger() if backend == "gloo" else StorageLedger()
    for category, tensors in local_state(workload).items():
        ledger.register(tensors, Category(category), category)
    return ledger


def measured_peak(workload: Workload, step: Callable[[], None], backend: str = "") -> int:
    """The ledger's peak over ``step`` (``rank_ledger``)."""
    ledger = rank_ledger(workload, backend)
    with ledger:
        step()
    return int(ledger.peak()[0])


@contextlib.contextmanager
def fake_rank(factory: Callable[[int], Workload], microbatch_size: int, microbatches: int,
              ranks: int, rank: int, blocks: Sequence[str]
              ) -> Iterator[tuple[Workload, Callable[[], None]]]:
    """Rank ``rank``'s workload, sharded, and its step, on fake tensors under torch's fake
    process group (NOTE [ Predicting FSDP2 with a fake process group ])."""
    from memprop.trace.fake import new_fake_mode

    with fake_group(rank, ranks) as mesh, new_fake_mode():
        torch.manual_seed(0)
        workload = factory(microbatch_size)
        shard(workload, blocks, mesh)
        yield workload, sharded_step(workload, microbatches)


def rank_peak_bytes(factory: Callable[[int], Workload], microbatch_size: int, microbatches: int,
                    ranks: int, rank: int, blocks: Sequence[str], backend: str = "gloo") -> int:
    """Rank ``rank``'s steady-state peak under FSDP2 on ``backend``: a step to make the
    optimizer's state, then the step under the ledger."""
    from memprop.loop import zero_gradients

    with fake_rank(factory, microbatch_size, microbatches, ranks, rank, blocks) as (
            workload, step):
        step()
        zero_gradients(workload)  # as the step does first, before the count (as on a rank)
        return measured_peak(workload, step, backend)


def unit_bytes(model: nn.Module, blocks: Sequence[str]) -> list[int]:
    """Bytes of each FSDP2 unit's parameters, unsharded: the blocks, then the root's rest."""
    sizes = [sum(p.numel() * p.element_size() for p in model.get_submodule(name).parameters())
             for name in blocks]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return [*sizes, total - sum(sizes)]
