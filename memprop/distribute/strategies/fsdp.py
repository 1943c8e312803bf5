"""``fsdp``: ``N`` ranks under FSDP2, each block a unit, then the root
(``memprop.distribute.fsdp``; NOTE [ Predicting FSDP2 with a fake process group ] there): each
kind of rank traced running FSDP2 itself under a fake process group."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

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
            request.time_sharded(request.batch_size // (request.devices * max(splits)))
        return [c for m in counts if (c := self._candidate(request, m)) is not None], []

    def _candidate(self, request: Request, microbatches: int) -> Candidate | None:
        """FSDP2 over every block; its step: the microbatches' compute, plus for each unit
        and microbatch an all-gather in the forward, another in the backward and a
        reduce-scatter of its gradients (NOTE [ Pricing collectives by their algorithm ]),
        not overlapped, and FSDP2's own work (``steptime.sharded_costs``). One rank of each
        kind is traced (``_alike_ranks``)."""
        from memprop.distribute import fsdp
        from memprop.plan.schedule import flat, simulate

        devices = request.devices
        micro = request.split(microbatches)
        if micro is None:
            return None
        workload, chain = request.chain(micro)
        blocks = tuple(s.name for s in chain.stages if not s.pinned)
        kinds = _alike_ranks(workload.model, devices)
        traced = {kind: fsdp.rank_peak_bytes(request.factory, micro, microbatches, devices,
                                             kinds[kind][0], blocks, request.backend)
                  for kind in kinds}
        peaks = [0] * devices
        for kind, ranks in kinds.items():
            for rank in ranks:
                peaks[rank] = traced[kind]
        comm = request.comm
        gathers = sum(2 * comm.allgather_s(size) + comm.reduce_scatter_s(size)
                      for size in fsdp.unit_bytes(workload.model, blocks))
        compute = simulate(chain, flat(len(chain))).compute
        own = request.sharded
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
