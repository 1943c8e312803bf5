"""Pipeline parallelism with ``torch.distributed.pipelining``: what each rank runs, predicted
by replaying its schedule on fake tensors under the ledger, and priced by simulating the
schedule.

NOTE [ Replaying a pipeline schedule ]
A rank's peak is not a formula of the schedule: it is the ledger's peak over the rank's own
actions, run in the rank's order on fake tensors (nothing allocated): the forward ``F`` and
backward ``B`` of its stages for each microbatch, with the references torch's schedule runtime
keeps. Those were found by measuring every rank of every schedule on gloo against this replay,
and they are what a formula misses:

- each stage other than the first holds a receive buffer per microbatch for its input, and
  each stage other than the last one per microbatch for its output's gradient; both are made
  on the first step and live between steps;
- ``ScheduleGPipe`` and the action-list runtime (``ScheduleInterleaved1F1B``,
  ``ScheduleLoopedBFS``) wait on their sends only at the end of ``step()``: every stage output
  and every input gradient sent stays alive until then, so memory grows with the microbatches;
- ``Schedule1F1B`` runs ``min(M, S - s)`` forwards before its first backward on stage ``s``
  (one more than the textbook's ``S - s - 1``), keeps its latest forward's output until the
  step ends, the one before the last warm-up forward until the steady phase ends, and each input
  gradient until the next backward is done;
- the last stage keeps every microbatch's output and loss until the step ends (to return
  them), then concatenates the outputs; the outputs stay in the stage (``output_chunks``)
  through the optimizer's step, until the next step clears them: the full batch of logits.
- a stage's buffers (BatchNorm's running statistics) are the rank's from before the step.

The order of a rank's actions is torch's own for the action-list schedules
(``get_schedule_ops``, no process group needed) and the order ``Schedule1F1B`` and
``ScheduleGPipe`` run in their code for those two. A rank counts its own stages' parameters,
gradients and optimizer state, and the batch's inputs on the first stage's rank and targets on
the last's.

Models: the pipeline is cut between the items of an ``nn.Sequential`` (the model itself, or a
model whose only child is one, holding every parameter, whose forward returns its output), one
tensor flowing between them, the loss computed from the last item's output and the targets, as
torch's manual ``PipelineStage`` needs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memprop.trace.fake import new_fake_mode
from memprop.trace.ledger import Category, StorageLedger
from memprop.workload import Workload

__all__ = [
    "SCHEDULES",
    "Action",
    "PipelineShape",
    "all_splits",
    "placement",
    "program",
    "rank_ledger",
    "rank_peak_bytes",
    "sequential_items",
    "simulated_seconds",
    "split_points",
    "splits_tried",
    "stage_modules",
]

SCHEDULES: dict[str, int] = {"GPipe": 1, "1F1B": 1, "Interleaved1F1B": 2, "LoopedBFS": 2}
"""The schedules tried, with the stages each rank holds (looped ones: two)."""

MAX_SPLITS_SEARCHED = 16
"""Every split is tried when there are at most this many; otherwise the balanced one only."""


@dataclass(frozen=True, slots=True)
class Action:
    kind: str
    """``F`` (forward), ``B`` (backward) or ``release`` (``Schedule1F1B``'s kept send)."""
    stage: int
    microbatch: int


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineShape:
    """One pipeline configuration: which schedule, how many ranks and microbatches, and where
    the items are cut."""

    schedule: str
    ranks: int
    microbatches: int
    bounds: tuple[int, ...]
    """Item index where each stage starts, then the number of items: stage ``s`` runs items
    ``bounds[s]`` to ``bounds[s + 1] - 1``."""
    recomputed: tuple[int, ...] = ()
    """Stages whose forward is checkpointed whole: only each microbatch's stage input is kept,
    the rest recomputed in its backward."""

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1


def placement(schedule: str, ranks: int) -> dict[int, list[int]]:
    """The stages each rank holds: rank ``r`` holds ``r``, ``r + P``, ... (torch's looped
    placement for the multi-stage schedules)."""
    per_rank = SCHEDULES[schedule]
    return {r: [r + v * ranks for v in range(per_rank)] for r in range(ranks)}


def program(schedule: str, rank: int, ranks: int, microbatches: int) -> list[Action]:
    """Rank ``rank``'s actions in the order its schedule runs them (NOTE [ Replaying a
    pipeline schedule ])."""
    stages = ranks * SCHEDULES[schedule]
    if schedule == "GPipe":
        return ([Action("F", rank, m) for m in range(microbatches)]
                + [Action("B", rank, m) for m in range(microbatches)])
    if schedule == "1F1B":
        warmup = min(microbatches, stages - rank)
        actions = [Action("F", rank, m) for m in range(warmup)]
        forward, backward = warmup, 0
        while True:
            actions.append(Action("B", rank, backward))
            backward += 1
            if forward == microbatches:
                break
            actions.append(Action("F", rank, forward))
            forward += 1
        actions.append(Action("release", rank, 0))
        return actions + [Action("B", rank, m) for m in range(backward, microbatches)]
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    ops = get_schedule_ops(schedule, ranks, microbatches, SCHEDULES[schedule])[rank]
    return [Action(str(op.computation_type.value)[0], op.stage_index, op.microbatch_index or 0)
            for op in ops if op is not None and str(op.computation_type.value) in ("F", "B")]


def sequential_items(workload: Workload) -> list[nn.Module] | str:
    """The items the pipeline is cut between, or why this workload cannot be pipelined."""
    model = workload.model
    if len(workload.inputs) != 1 or workload.keywords:
        return "the model takes more than one input tensor; a pipeline sends one between stages"
    if workload.loss_fn is None or workload.targets is None:
        return "the loss needs a loss function of the output and the targets"
    inner: nn.Module = model
    if not isinstance(inner, nn.Sequential):
        children = list(model.children())
        if len(children) != 1 or not isinstance(children[0], nn.Sequential):
            return ("the model is not an nn.Sequential (nor wraps exactly one): torch's "
                    "pipeline stages are built from its items")
        inner = children[0]
        owned = {id(t) for t in itertools.chain(inner.parameters(), inner.buffers())}
        if any(id(t) not in owned
               for t in itertools.chain(model.parameters(), model.buffers())):
            return "the model holds parameters outside its nn.Sequential"
    assert isinstance(inner, nn.Sequential)
    holders: dict[int, set[int]] = {}
    for index, item in enumerate(inner):
        for parameter in item.parameters():
            holders.setdefault(id(parameter), set()).add(index)
    if any(len(items) > 1 for items in holders.values()):
        return ("items share a parameter (tied weights): each stage would keep its own copy "
                "and its own gradient, which a pipeline does not reconcile")
    return _checked_forward(workload, inner) or list(inner)


def _checked_forward(workload: Workload, inner: nn.Module) -> str:
    """Why a fake forward and loss show the step cannot be cut between ``inner``'s items, or
    empty: the model must return ``inner(x)``, and the loss must read nothing but the output
    and the targets (the last stage holds no other stage's parameters)."""
    seen: list[tuple[Any, Any]] = []
    handle = inner.register_forward_hook(lambda _m, args, out: seen.append((args, out)))
    try:
        with new_fake_mode():
            output = workload.forward()
            assert workload.loss_fn is not None
            loss = workload.loss_fn(output.detach(), workload.targets)
    finally:
        handle.remove()
    if not (len(seen) == 1 and output is seen[0][1]
            and len(seen[0][0]) == 1 and seen[0][0][0] is workload.inputs[0]):
        return "the model's forward does more than call its nn.Sequential"
    if loss.requires_grad:
        return ("the loss reads the model's parameters (an L2 penalty in the loss, say), which "
                "no single stage holds (use the optimizer's weight decay instead)")
    return ""


def split_points(costs: Sequence[float], stages: int) -> tuple[int, ...]:
    """Bounds cutting items of ``costs`` into ``stages`` contiguous non-empty stages so that
    the costliest stage is as cheap as can be (dynamic programming over prefixes)."""
    n = len(costs)
    prefix = [0.0, *itertools.accumulate(costs)]
    # best[k][i]: the least slowest stage for the first i items in k stages; cut[k][i] its cut.
    best = [[float("inf")] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds = [n]
    for k in range(stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return tuple(reversed(bounds))


def all_splits(items: int, stages: int) -> list[tuple[int, ...]]:
    """Every way to cut ``items`` into ``stages`` contiguous non-empty stages."""
    return [(0, *cuts, items) for cuts in itertools.combinations(range(1, items), stages - 1)]


def splits_tried(items: int, stages: int, costs: Sequence[float]) -> list[tuple[int, ...]]:
    """The splits tried: all when few (counted, not listed: a deep model has millions), else
    the balanced one."""
    if math.comb(items - 1, stages - 1) <= MAX_SPLITS_SEARCHED:
        return all_splits(items, stages)
    return [split_points(costs, stages)]


class Recomputed(nn.Module):
    """A stage checkpointed whole (non-reentrant, the RNG replayed): its forward keeps only
    its input for the backward, which runs the forward again first."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        out: torch.Tensor = checkpoint(self.stage, x, use_reentrant=False)
        return out


def stage_modules(items: Sequence[nn.Module], shape: PipelineShape) -> list[nn.Module]:
    """The modules of ``shape``'s stages, the recomputed ones checkpointed whole."""
    stages = [nn.Sequential(*items[a:b]) for a, b in itertools.pairwise(shape.bounds)]
    return [Recomputed(m) if s in shape.recomputed else m for s, m in enumerate(stages)]


def rank_peak_bytes(workload: Workload, items: Sequence[nn.Module], shape: PipelineShape,
                    rank: int) -> int:
    """Rank ``rank``'s steady-state peak under ``shape``, replayed on ``workload``'s fake
    tensors (``items``: its ``sequential_items``), under the fake mode that built them, still
    active (NOTE [ Replaying a pipeline schedule ])."""
    from memprop.loop import remade_optimizer

    m_count, stages = shape.microbatches, shape.stages
    modules = stage_modules(items, shape)
    mine = placement(shape.schedule, shape.ranks)[rank]
    inputs = workload.inputs[0].tensor_split(m_count)
    assert workload.targets is not None and workload.loss_fn is not None
    targets = workload.targets.tensor_split(m_count)
    loss_fn = workload.loss_fn
    boundary = [inputs[0]]  # each stage's input, for the receive buffers' shapes
    with torch.no_grad():
        for module in modules[:max(mine) + 1]:
            boundary.append(module(boundary[-1]))
    parameters = [p for s in mine for p in modules[s].parameters()]
    optimizer = remade_optimizer(workload, parameters)
    _steady_state(parameters, optimizer, keep_gradients=not workload.set_to_none)
    received = {s: [torch.empty_like(boundary[s]).requires_grad_(True)
                    for _ in range(m_count)] for s in mine if s > 0}
    gradients_in = {s: [torch.empty_like(boundary[s + 1]) for _ in range(m_count)]
                    for s in mine if s < stages - 1}
    ledger = rank_ledger(workload, shape, rank, parameters, optimizer,
                         [b for kept in (*received.values(), *gradients_in.values())
                          for b in kept])
    with ledger:
        outputs = _replay(program(shape.schedule, rank, shape.ranks, m_count), shape.schedule,
                          stages, modules, inputs, targets, loss_fn, received, gradients_in)
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.div_(m_count)  # the schedule's scale_grads
        if optimizer is not None:
            optimizer.step()
        del outputs
    return ledger.peak()[0]


def rank_ledger(workload: Workload, shape: PipelineShape, rank: int,
                parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer | None,
                receive_buffers: list[torch.Tensor]) -> StorageLedger:
    """A ledger holding what a rank holds before its step: its stages' parameters, the
    gradients the loop keeps (``set_to_none=False``), buffers and optimizer state, the batch's
    inputs if it runs the first stage and targets if the last, and the schedule's receive
    buffers."""
    from memprop.trace.step import optimizer_state

    mine = placement(shape.schedule, shape.ranks)[rank]
    ledger = StorageLedger()
    ledger.register(parameters, Category.PARAMETERS, "parameters")
    ledger.register([p.grad for p in parameters if p.grad is not None], Category.GRADIENTS,
                    "gradients")
    items = list(_items(workload.model))
    ledger.register([b for s in mine for item in items[shape.bounds[s]:shape.bounds[s + 1]]
                     for b in item.buffers()], Category.BUFFERS, "buffers")
    if optimizer is not None:
        ledger.register(optimizer_state(optimizer), Category.OPTIMIZER_STATE, "optimizer")
    if 0 in mine:
        ledger.register(workload.inputs, Category.INPUTS, "inputs")
    if shape.stages - 1 in mine and workload.targets is not None:
        ledger.register([workload.targets], Category.INPUTS, "targets")
    ledger.register(receive_buffers, Category.TEMPORARIES, "receive buffers")
    return ledger


def _items(model: nn.Module) -> nn.Sequential:
    """The nn.Sequential whose items a pipeline cuts (``sequential_items`` has checked it)."""
    inner = model if isinstance(model, nn.Sequential) else next(model.children())
    assert isinstance(inner, nn.Sequential)
    return inner


def _steady_state(parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer | None,
                  *, keep_gradients: bool) -> None:
    """The optimizer's state made by a step before, the gradients freed as the loop does
    (``set_to_none``) or kept."""
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    if optimizer is not None:
        optimizer.step()
    if not keep_gradients:
        for parameter in parameters:
            parameter.grad = None


def _replay(actions: list[Action], schedule: str, stages: int, modules: list[nn.Module],
            inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
            loss_fn: Callable[..., torch.Tensor], received: dict[int, list[torch.Tensor]],
            gradients_in: dict[int, list[torch.Tensor]]) -> list[torch.Tensor]:
    """The actions, holding what torch's runtime holds (NOTE [ Replaying a pipeline
    schedule ]); the last stage's outputs, which the stage keeps after the step."""
    waits_at_end = schedule != "1F1B"
    held: list[torch.Tensor] = []  # sends waited on at the end of the step
    second_last_warmup: list[torch.Tensor] = []  # Schedule1F1B: its send's work is kept
    latest: list[torch.Tensor | None] = [None, None]  # Schedule1F1B: last output, last gradient
    cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    outputs: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []  # kept to hand back at the end
    last = stages - 1
    for action in actions:
        s, m = action.stage, action.microbatch
        if action.kind == "release":
            second_last_warmup.clear()
            continue
        if action.kind == "F":
            given = inputs[m] if s == 0 else received[s][m]
            output = modules[s](given)
            if s == last:
                outputs.append(output)
                losses.append(loss_fn(output, targets[m]))
                cache[(s, m)] = (losses[-1], given)
            else:
                cache[(s, m)] = (output, given)
                if waits_at_end:
                    held.append(output)
                else:
                    latest[0] = output
                    if m == min(len(inputs), stages - s) - 2:
                        second_last_warmup.append(output)
            del output, given
            continue
        output, given = cache.pop((s, m))
        torch.autograd.backward([output], grad_tensors=[None if s == last
                                                         else gradients_in[s][m]])
        if s > 0:
            gradient = given.grad
            given.grad = None
            assert gradient is not None
            if waits_at_end:
                held.append(gradient)
            else:
                latest[1] = gradient
            del gradient
        del output, given
    del held[:], second_last_warmup[:], cache
    latest[:] = [None, None]
    if outputs:
        torch.cat(outputs)  # the merged output step() returns
    return outputs


def simulated_seconds(shape: PipelineShape, forward_s: Sequence[float],
                      backward_s: Sequence[float], send_s: Callable[[int], float],
                      boundary_bytes: Sequence[int]) -> float:
    """The step's time: every rank runs its actions in order, each as soon as its inputs have
    arrived (a stage's forward after the previous stage's, its backward after the next
    stage's, a send between ranks priced by ``send_s``); the bubbles fall out."""
    ranks = shape.ranks
    owner = {s: r for r, held in placement(shape.schedule, ranks).items() for s in held}
    queues = [[a for a in program(shape.schedule, r, ranks, shape.microbatches)
               if a.kind != "release"] for r in range(ranks)]
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * ranks
    position = [0] * ranks
    last = shape.stages - 1

    def ready(action: Action) -> float | None:
        s, m = action.stage, action.microbatch
        needs = [("F", s - 1, m)] if action.kind == "F" and s > 0 else []
        if action.kind == "B":
            needs = [("F", s, m)] + ([("B", s + 1, m)] if s < last else [])
        times = []
        for need in needs:
            if need not in done:
                return None
            crossing = owner[need[1]] != owner[s]
            size = boundary_bytes[max(s, need[1])]
            times.append(done[need] + (send_s(size) if crossing else 0.0))
        return max(times, default=0.0)

    while any(position[r] < len(queues[r]) for r in range(ranks)):
        progressed = False
        for r in range(ranks):
            while position[r] < len(queues[r]):
                action = queues[r][position[r]]
                start = ready(action)
                if start is None:
                    break
                cost = (forward_s if action.kind == "F" else backward_s)[action.stage]
                clock[r] = max(clock[r], start) + cost
                done[(action.kind, action.stage, action.microbatch)] = clock[r]
                position[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"{shape.schedule}: the schedule waits on itself")
    return max(clock)
