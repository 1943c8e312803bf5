"""``pipeline``: ``N`` ranks running one of ``torch.distributed.pipelining``'s schedules over
``M`` microbatches, the model's ``nn.Sequential`` cut between its items
(``memprop.distribute.pipeline``; NOTE [ Replaying a pipeline schedule ] there): each rank's
peak replayed from its schedule, the step simulated."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from memprop.distribute import pipeline as pp
from memprop.distribute.pipeline import PipelineShape
from memprop.distribute.strategy import BuiltRank, Candidate, Factory, Rank, Request, Strategy
from memprop.errors import UsageError
from memprop.trace.fake import new_fake_mode
from memprop.workload import Workload

__all__ = ["PIPELINE"]


class _Pipeline(Strategy):
    name = "pipeline"
    label = "pipeline"
    predicted_as = "replayed from its schedule, its step simulated"

    def candidates(self, request: Request, counts: Sequence[int], *, alone: bool
                   ) -> tuple[list[Candidate], list[str]]:
        if request.devices < 2:
            if alone:
                raise UsageError("a pipeline needs at least 2 devices")
            return [], []
        found, why = _pipeline_candidates(request, list(counts))
        if why and not found and alone:
            raise UsageError(f"no pipeline: {why}")
        notes = [f"no pipeline {'of some schedules' if found else 'candidates'}: {why}"] \
            if why else []
        return found, notes

    def microbatch_sizes(self, request: Request, counts: Sequence[int]) -> set[int]:
        if request.devices < 2:
            return set()
        return {request.batch_size // m for m in counts
                if request.batch_size % m == 0 and m >= request.devices}

    def describe(self, candidate: Candidate) -> str:
        shape = candidate.pipeline
        assert shape is not None
        cuts = "|".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}"
                        for a, b in itertools.pairwise(shape.bounds))
        again = (f", recomputing stage{'s' if len(shape.recomputed) > 1 else ''} "
                 + ",".join(map(str, shape.recomputed)) if shape.recomputed else "")
        return (f"{shape.schedule} {candidate.devices} ranks, "
                f"{candidate.microbatches}x{candidate.microbatch_size}, blocks {cuts}{again}")

    @contextlib.contextmanager
    def build_rank(self, factory: Factory, candidate: Candidate, rank: int
                   ) -> Iterator[BuiltRank]:
        yield _built_rank(factory, candidate, rank)


PIPELINE = _Pipeline()


def _pipeline_candidates(request: Request, counts: list[int]) -> tuple[list[Candidate], str]:
    """One candidate per schedule and microbatch count. Empty, with the reason, when the
    model cannot be cut."""
    devices, batch_size = request.devices, request.batch_size
    with new_fake_mode():  # one fake workload replayed for every shape and rank
        whole = request.factory(batch_size)
        items = pp.sequential_items(whole)
        if isinstance(items, str):
            return [], items
        names = {id(m): name for name, m in whole.model.named_modules()}
        item_names = [names[id(item)] for item in items]
        found: list[Candidate] = []
        skipped = []
        for schedule, per_rank in pp.SCHEDULES.items():
            stages = devices * per_rank
            if stages > len(items):
                skipped.append(f"{schedule} needs {stages} blocks, the model has {len(items)}")
                continue
            for m_count in counts:
                if batch_size % m_count or m_count < devices or (per_rank > 1
                                                                 and m_count % devices):
                    # Fewer microbatches than ranks leave ranks idle (and Schedule1F1B
                    # refuses them); the looped schedules take them in rounds of the ranks.
                    continue
                found.append(_pipeline_candidate(request, whole, items, item_names, schedule,
                                                 m_count))
    if skipped:
        return found, f"{'; '.join(skipped)} (a stage per block at least)"
    if not found:
        return found, (f"{devices} ranks need {devices} microbatches or more (a multiple of "
                       f"{devices} for the looped schedules) that divide the batch of "
                       f"{batch_size}: give --microbatches {devices},{2 * devices}")
    return found, ""


def _pipeline_candidate(request: Request, whole: Workload, items: list[Any],
                        item_names: list[str], schedule: str, m_count: int) -> Candidate:
    """The splits tried in order of their predicted step, replayed until one fits: the
    fastest that fits; when none does, the one with the least peak, its over-budget ranks
    recomputing (``_recompute_stages``)."""
    devices = request.devices
    micro = request.batch_size // m_count
    forward, backward, boundary = _item_costs(request, micro, item_names)
    factor = request.factor(micro)
    forward, backward = [f * factor for f in forward], [b * factor for b in backward]
    action = request.pipeline_action_s(schedule)

    def seconds(shape: PipelineShape) -> float:
        """The simulated step; a recomputed stage runs its forward again in its backward."""
        stage_f = [f + action for f in _per_stage(forward, shape.bounds)]
        stage_b = [b + action + (f if s in shape.recomputed else 0.0) for s, (f, b) in
                   enumerate(zip(stage_f, _per_stage(backward, shape.bounds), strict=True))]
        return pp.simulated_seconds(shape, stage_f, stage_b, request.comm.send.seconds,
                                    [boundary[b] for b in shape.bounds])

    shapes = sorted((pp.PipelineShape(schedule=schedule, ranks=devices, microbatches=m_count,
                                      bounds=bounds)
                     for bounds in pp.splits_tried(len(items), devices * pp.SCHEDULES[schedule],
                                                   [f + b for f, b in zip(forward, backward,
                                                                          strict=True)])),
                    key=seconds)
    replayed: list[tuple[list[int], PipelineShape]] = []
    for shape in shapes:
        replayed.append(([pp.rank_peak_bytes(whole, items, shape, r) for r in range(devices)],
                         shape))
        if request.fits(max(replayed[-1][0])):
            break
    peaks, shape = replayed[-1]
    if not request.fits(max(peaks)):
        peaks, shape = min(replayed, key=lambda r: max(r[0]))
        assert request.budget_bytes is not None
        shape, peaks = _recompute_stages(whole, items, shape, peaks, request.budget_bytes)
    return Candidate(
        strategy=PIPELINE.name, devices=devices, microbatches=m_count, microbatch_size=micro,
        layout=shape, fits=request.fits(max(peaks)),
        predicted_step_s=seconds(shape) + request.optimizer_s(_largest_share(items, shape)),
        ranks=tuple(Rank(rank=r, predicted_peak_bytes=p) for r, p in enumerate(peaks)),
        least_budget_bytes=max(peaks))


def _largest_share(items: list[Any], shape: PipelineShape) -> float:
    """The largest share of the parameters one rank holds: its optimizer's step ends the
    pipeline's step (the ranks step their own stages' parameters at once)."""
    sizes = [sum(p.numel() for item in items[a:b] for p in item.parameters())
             for a, b in itertools.pairwise(shape.bounds)]
    total = sum(sizes)
    if not total:
        return 0.0
    held = pp.placement(shape.schedule, shape.ranks)
    return float(max(sum(sizes[s] for s in stages) for stages in held.values()) / total)


def _recompute_stages(whole: Workload, items: list[Any], shape: PipelineShape,
                      peaks: list[int], budget_bytes: int) -> tuple[PipelineShape, list[int]]:
    """Checkpoint whole stages of the ranks over the budget, one at a time (on a rank with two,
    the one whose checkpoint frees more first), each replayed, until every rank fits or every
    stage of those ranks is checkpointed."""
    held = pp.placement(shape.schedule, shape.ranks)
    peaks = list(peaks)
    while True:
        over = [r for r, p in enumerate(peaks) if p > budget_bytes]
        if not over:
            return shape, peaks
        rank = over[0]
        left = [s for s in held[rank] if s not in shape.recomputed]
        if not left:
            return shape, peaks
        trials = []
        for stage in left:
            trial = dataclasses.replace(shape, recomputed=tuple(sorted(
                (*shape.recomputed, stage))))
            trials.append((pp.rank_peak_bytes(whole, items, trial, rank), trial))
        peaks[rank], shape = min(trials, key=lambda t: t[0])


def _item_costs(request: Request, micro: int, item_names: list[str]
                ) -> tuple[list[float], list[float], list[int]]:
    """Each item's forward and backward seconds on a microbatch (the roofline's), and the
    bytes crossing each cut (index ``i``: item ``i``'s input; the last: the output).

    The chain's stages are the model's blocks: each is summed into the item it belongs to by
    name (an item, or a module inside one); the pinned prefix goes to the first item, the
    suffix to the last. A cut after an item without blocks carries what the previous one did."""
    from memprop.trace.stages import StageRef

    _, chain = request.chain(micro)
    forward, backward = [0.0] * len(item_names), [0.0] * len(item_names)
    outputs: list[int | None] = [None] * len(item_names)
    for stage in chain.stages:
        kind = StageRef.named(stage.name).kind
        if kind == "prefix":
            index = 0
        elif kind == "suffix":
            index = len(item_names) - 1
        else:
            index = next((i for i, name in enumerate(item_names)
                          if stage.name == name or stage.name.startswith(name + ".")), -1)
        if index < 0:  # blocks that are not the items: the step spread evenly over them
            total_f = sum(s.forward_cost for s in chain.stages) / len(item_names)
            total_b = sum(s.backward_cost for s in chain.stages) / len(item_names)
            size = max(s.output_bytes for s in chain.stages)
            return ([total_f] * len(item_names), [total_b] * len(item_names),
                    [size] * (len(item_names) + 1))
        forward[index] += stage.forward_cost
        backward[index] += stage.backward_cost
        if kind == "block":
            outputs[index] = stage.output_bytes
    first = next(s for s in chain.stages if StageRef.named(s.name).kind != "prefix")
    boundary = [first.input_bytes]
    for output in outputs:
        boundary.append(boundary[-1] if output is None else output)
    return forward, backward, boundary


def _per_stage(costs: list[float], bounds: tuple[int, ...]) -> list[float]:
    return [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]


def _built_rank(factory: Factory, candidate: Candidate, rank: int) -> BuiltRank:
    """This rank's stages of ``candidate.pipeline`` run by torch's schedule (what exists before
    its step: the rank's parameters, optimizer state, the inputs or targets its stages use,
    the schedule's receive buffers)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import get_schedule_class

    from memprop.loop import accumulated_step, remade_optimizer, tensors_in

    shape = candidate.pipeline
    assert shape is not None
    torch.manual_seed(0)
    workload: Workload = factory(candidate.microbatch_size * shape.microbatches)
    items = pp.sequential_items(workload)
    assert not isinstance(items, str), items
    modules = pp.stage_modules(items, shape)
    mine = pp.placement(shape.schedule, shape.ranks)[rank]
    device = workload.inputs[0].device
    stages = [PipelineStage(modules[s], s, shape.stages, device) for s in mine]
    parameters = [p for s in mine for p in modules[s].parameters()]
    optimizer = remade_optimizer(workload, parameters)
    # The rank's loop: its stages' parameters, zeroed and stepped by their optimizer.
    own = dataclasses.replace(workload, model=torch.nn.ModuleList([modules[s] for s in mine]),
                              optimizer=optimizer)
    kind = get_schedule_class(shape.schedule)
    schedule = kind(stages[0] if len(stages) == 1 else stages,
                    n_microbatches=shape.microbatches, loss_fn=workload.loss_fn)
    first, last = 0 in mine, shape.stages - 1 in mine

    def passes() -> None:
        arguments = workload.inputs if first else ()
        if last:
            schedule.step(*arguments, target=workload.targets, losses=[])
        else:
            schedule.step(*arguments)

    def received() -> list[torch.Tensor]:
        return [info.buffer for stage in stages
                for kept in (*stage.args_recv_info.values(), *stage.grad_recv_info.values())
                for info in kept if info.buffer is not None]

    def held() -> list[torch.Tensor]:
        return [*parameters, *(b for s in mine for b in modules[s].buffers()), *received(),
                *(tensors_in(list(optimizer.state.values())) if optimizer is not None else ()),
                *(workload.input_tensors if first else ()),
                *((workload.targets,) if last and workload.targets is not None else ()),
                *(p.grad for p in parameters if p.grad is not None)]

    return BuiltRank(step=lambda: accumulated_step(own, passes=passes), loop=own,
                     ledger=lambda: pp.rank_ledger(workload, shape, rank, parameters,
                                                   optimizer, received()),
                     held=held, device=device)
