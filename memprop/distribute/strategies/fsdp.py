"""``fsdp``: ``N`` ranks under FSDP2, each block a unit, then the root
(``memprop.distribute.fsdp``; NOTE [ Predicting FSDP2 with a fake process group ] there): each
kind of rank traced running FSDP2 itself under a fake process group."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from memprop.distribute.strategy import BuiltRank, Candidate, Factory, Rank, Request, Strategy

__all__ = ["FSDP"]


class _FSDP(Strategy):
    name = "fsdp"
    label = "FSDP2"
    predicted_as = "FSDP2 itself traced under a fake process group"

    def candidates(self, request: Request, counts: Sequence[int], *, alone: bool
                   ) -> tuple[list[Candidate], list[str]]:
        from memprop.distribute import fsdp

        if request.devices < 2:
            return [], []
        if why := fsdp.why_not():
            return [], [f"no FSDP2 candidates: {why}"]
        splits = [m for m in counts if request.split(m) is not None]
        if splits:  # timed on the smallest microbatch
            smallest = request.batch_size // (request.devices * max(splits))
            request.time_sharded(smallest)
            _time_collectives(request, smallest)
        return [c for m in counts if (c := self._candidate(request, m)) is not None], []

    def _candidate(self, request: Request, microbatches: int) -> Candidate | None:
        """FSDP2 over every block; its step: the microbatches' compute, plus for each unit
        and microbatch an all-gather in the forward, another in the backward and a
        reduce-scatter of its gradients (NOTE [ Pricing collectives by their algorithm ]),
        not overlapped, scaled to what they take as FSDP2 runs them on real ranks here (NOTE
        [ FSDP2's collectives on real ranks ] in ``steptime``), and FSDP2's own work
        (``steptime.sharded_costs``). One rank of each
        kind is traced (``_alike_ranks``)."""
        from memprop.distribute import fsdp
        from memprop.plan.schedule import flat, simulate

        devices = request.devices
        micro = request.split(microbatches)
        if micro is None:
            return None
        workload, chain = request.chain(micro)
        blocks = request.blocks(micro)
        kinds = _alike_ranks(workload.model, devices)
        traced = {kind: fsdp.rank_peak_bytes(request.factory, micro, microbatches, devices,
                                             kinds[kind][0], blocks, request.backend)
                  for kind in kinds}
        peaks = [0] * devices
        for kind, ranks in kinds.items():
            for rank in ranks:
                peaks[rank] = traced[kind]
        own = request.sharded
        gathers = collectives_s(request.comm, workload.model, blocks) * (
            1.0 if own is None else own.collectives_scale)
        compute = simulate(chain, flat(len(chain))).compute
        per_microbatch = 0.0 if own is None else own.per_microbatch_s
        per_step = request.optimizer_s(1 / devices) if own is None else own.per_step_s
        return Candidate(
            strategy=self.name, devices=devices, microbatches=microbatches,
            microbatch_size=micro, fits=request.fits(max(peaks)),
            predicted_step_s=(microbatches * (request.factor(micro) * compute + per_microbatch
                                              + gathers) + per_step),
            ranks=tuple(Rank(rank=r, predicted_peak_bytes=p) for r, p in enumerate(peaks)),
            least_budget_bytes=max(peaks), layout=blocks)

    @contextlib.contextmanager
    def build_rank(self, factory: Factory, candidate: Candidate, rank: int
                   ) -> Iterator[BuiltRank]:
        """FSDP2 over the candidate's blocks on the launch's group (the rank's shards,
        optimizer state and inputs registered before its step)."""
        from memprop.devices.allocator import step_state_tensors
        from memprop.distribute import fsdp
        from memprop.distribute.launch import device_of
        from memprop.workload import Workload

        torch.manual_seed(0)
        workload: Workload = factory(candidate.microbatch_size)
        fsdp.shard(workload, candidate.sharded)
        yield BuiltRank(step=fsdp.sharded_step(workload, candidate.microbatches), loop=workload,
                        ledger=lambda: fsdp.rank_ledger(workload),
                        held=lambda: step_state_tensors(workload), device=device_of(workload))


def collectives_s(comm: Any, model: torch.nn.Module, blocks: Sequence[str]) -> float:
    """A microbatch's collectives priced over ``comm``'s links: for each unit an all-gather in
    the forward, another in the backward and a reduce-scatter of its gradients."""
    from memprop.distribute import fsdp

    return float(sum(2 * comm.allgather_s(size) + comm.reduce_scatter_s(size)
                     for size in fsdp.unit_bytes(model, blocks)))


def _time_collectives(request: Request, micro: int) -> None:
    """``request.sharded`` with FSDP2's collectives as they run on real ranks over their
    price (NOTE [ FSDP2's collectives on real ranks ] in ``steptime``): a microbatch of
    ``micro`` timed on as many real ranks as the links were (no more than the cores), against
    the fake group's step of the same world. Not when nothing was timed, or the links are
    given for another machine (what runs here says nothing of theirs), nor for a factory that
    cannot be sent to a rank (a lambda: the prediction of a Python caller must not fail)."""
    import pickle

    from memprop.distribute import steptime
    from memprop.distribute.communication import communication, timed_ranks
    from memprop.distribute.launch import available_cores

    own, comm = request.sharded, request.comm
    if own is None or comm is None or not comm.timed_here:
        return
    try:
        pickle.dumps(request.factory)
    except (pickle.PicklingError, AttributeError, TypeError):
        return
    workload, blocks = request.chain(micro)[0], request.blocks(micro)
    ranks = timed_ranks(request.devices)
    fake = own if ranks == request.devices else steptime.sharded_costs(
        request.factory, micro, blocks, ranks, max(1, available_cores() // ranks), 0.0)
    if fake is None:
        return
    real = steptime.real_microbatch_s(request.factory, micro, blocks, ranks, request.backend)
    priced = collectives_s(communication(request.backend, ranks), workload.model, blocks)
    request.sharded = dataclasses.replace(own, collectives_scale=steptime.collectives_scale(
        real, fake.microbatch_s, priced))


def _alike_ranks(model: torch.nn.Module, devices: int) -> dict[tuple[int, ...], list[int]]:
    """The ranks of an FSDP2 world grouped by the rows of every parameter they hold: FSDP2
    shards each parameter's first dimension as ``torch.chunk`` does (``ceil(rows / N)`` rows
    a rank, the last ranks fewer or none), and ranks holding the same rows of everything run
    the same step on tensors of the same sizes. Of 4096 ranks a handful are traced."""
    sizes = [p.shape[0] if p.dim() else 1 for p in model.parameters()]
    kinds: dict[tuple[int, ...], list[int]] = {}
    for rank in range(devices):
        held = []
        for rows in sizes:
            chunk = -(-rows // devices)
            held.append(max(0, min(chunk, rows - rank * chunk)))
        kinds.setdefault(tuple(held), []).append(rank)
    return kinds


FSDP = _FSDP()
