"""FSDP2, ZeRO-1 and pipelines per rank against the allocator: memprop's prediction (FSDP2
itself under a fake process group, the storage ledger; ZeRO-1's chain with the rank's share of
the optimizer; a pipeline's replayed schedule) beside a figure that shares nothing with the
ledger, measured on real gloo ranks by c10d's CPU allocator as torch.profiler reports it
(``profile_memory=True``, the profiler running in the rank from before the model is built), and
torch's FSDPMemTracker as a second opinion. Models memprop was not written for: a residual
LayerNorm MLP, a Hugging Face Llama from a small config, a conv net with BatchNorm, and the seed
MLP; AdamW and SGD with momentum; 2 and 4 ranks; 1 to 8 microbatches. One launch per world
size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from memprop.distribute import fsdp
from memprop.distribute.launch import spawn
from memprop.trace.fake import new_fake_mode as fake_mode
from memprop.workload import SeedConfig, Workload, seed_workload

TOLERANCE = 0.01
LATE_BYTES_IGNORED = 0.001
"""Blocks freed out of the profiler's sight that add up to less than this share of the peak
leave the figure two-sided."""
STEPS = 3
"""Steps each rank runs per case; the last is measured (the first makes the optimizer's state)."""


class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


def residual_mlp(batch_size: int) -> Workload:
    model = nn.Sequential(nn.Linear(64, 256), *(_ResidualBlock(256) for _ in range(4)),
                          nn.Linear(256, 10))
    return Workload(model=model, inputs=(torch.randn(batch_size, 64),),
                    targets=torch.randint(0, 10, (batch_size,)),
                    loss_fn=nn.functional.cross_entropy,
                    optimizer=torch.optim.AdamW(model.parameters()))


def conv_net(batch_size: int) -> Workload:
    def unit(inside: int, outside: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(inside, outside, 3, padding=1), nn.BatchNorm2d(outside),
                             nn.ReLU())

    model = nn.Sequential(unit(3, 16), unit(16, 32), unit(32, 32), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10))
    return Workload(model=model, inputs=(torch.randn(batch_size, 3, 32, 32),),
                    targets=torch.randint(0, 10, (batch_size,)),
                    loss_fn=nn.functional.cross_entropy,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))


def batch_norm_mlp(batch_size: int) -> Workload:
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
                          nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
    return Workload(model=model, inputs=(torch.randn(batch_size, 64),),
                    targets=torch.randint(0, 10, (batch_size,)),
                    loss_fn=nn.functional.cross_entropy,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))


def wide_head(batch_size: int) -> Workload:
    """A classifier whose last stage peaks in AdamW's step, with the batch's logits kept."""
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 2048))
    return Workload(model=model, inputs=(torch.randn(batch_size, 64),),
                    targets=torch.randint(0, 2048, (batch_size,)),
                    loss_fn=nn.functional.cross_entropy,
                    optimizer=torch.optim.AdamW(model.parameters()))


def llama(batch_size: int) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, use_cache=False)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (batch_size, 32))
    return Workload(model=model, inputs=(), keywords={"input_ids": ids, "labels": ids},
                    optimizer=torch.optim.AdamW(model.parameters()))


def seed_mlp(batch_size: int) -> Workload:
    return seed_workload(SeedConfig(input_dim=64, hidden=256, classes=10, depth=4,
                                    batch=batch_size, optimizer="momentum"))


FACTORIES: dict[str, tuple[Callable[[int], Workload], tuple[str, ...]]] = {
    "residual MLP": (residual_mlp, ("1", "2", "3", "4")),
    "conv net": (conv_net, ("0", "1", "2")),
    "Llama": (llama, ("model.layers.0", "model.layers.1", "model.layers.2")),
    "seed MLP": (seed_mlp, ("layers.0", "layers.1", "layers.2", "layers.3")),
}


def _allocator_peak(profiler: Any, window: str, known: set[int]) -> tuple[int, int]:
    """The allocator's peak inside the ``record_function`` called ``window``: every block
    reported allocated since the profiler started and not yet freed, at every allocation event;
    and whether a free the profiler could not see may have happened in the window.

    c10d's gloo backend frees some blocks on its own worker thread, which the profiler does not
    follow, so their frees are never reported. A block allocated inside a ``c10d::`` op (gloo's
    copy of a reduce-scatter's input) is counted freed when that op returns (the collective's
    work holds it until it completes). Any other block whose free went unreported (an all-gather
    buffer gloo's worker let go after FSDP2 did) is counted live until its address is handed
    out again, or to the end when it is not one of the storages ``known`` to be live then: that
    figure can only read high. The second figure leaves such late blocks out altogether, so it
    can only read low: the real peak lies between the two, which are equal when nothing was
    freed out of sight."""
    events: list[tuple[int, int, int, int | None]] = []
    span = None
    stack = [(node, None) for node in profiler.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, c10d_end = stack.pop()
        kind, fields = node.typed
        if kind.name == "Allocation":
            events.append((node.start_time_ns, fields.alloc_size, fields.ptr, c10d_end))
            continue
        if node.name == window:
            span = (node.start_time_ns, node.end_time_ns)
        if c10d_end is None and node.name.startswith("c10d::"):
            c10d_end = node.end_time_ns
        stack.extend((child, c10d_end) for child in node.children)
    assert span is not None, window
    events.sort(key=lambda e: e[0])
    owner: dict[int, int] = {}
    unreported: dict[int, int] = {}  # index of the allocation -> when it was found gone
    for index, (time, size, ptr, _) in enumerate(events):
        if size > 0:
            if ptr in owner:
                unreported[owner[ptr]] = time
            owner[ptr] = index
        elif ptr in owner:
            owner.pop(ptr)
    last = events[-1][0]
    unreported.update({i: last for ptr, i in owner.items()
                       if events[i][3] is not None or ptr not in known})

    def replay(with_late: bool) -> int:
        timeline = []
        for index, (time, size, ptr, c10d_end) in enumerate(events):
            late = index in unreported and c10d_end is None
            if late and not with_late:
                continue
            timeline.append((time, 0, size, ptr))
            if index in unreported and c10d_end is not None:
                timeline.append((c10d_end, 1, -size, ptr))
        timeline.sort(key=lambda e: (e[0], e[1]))
        live: dict[int, int] = {}
        total = peak = 0
        for time, _, size, ptr in timeline:
            if size > 0:
                total += size - live.get(ptr, 0)
                live[ptr] = size
            elif ptr in live:
                total -= live.pop(ptr)
            if span[0] <= time <= span[1]:
                peak = max(peak, total)
        return peak

    upper = replay(with_late=True)
    lower = replay(with_late=False)
    # Scalars c10d keeps (8 B each) are not worth a doubt.
    return upper, upper if upper - lower <= LATE_BYTES_IGNORED * upper else lower


def _live_pointers(workload: Workload) -> set[int]:
    """Data pointers of what a rank holds after its step: parameters, gradients, buffers,
    optimizer state, inputs (each DTensor's local shard)."""
    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    model = workload.model
    tensors = [*model.parameters(), *model.buffers(), *workload.input_tensors]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if workload.targets is not None:
        tensors.append(workload.targets)
    if workload.optimizer is not None:
        tensors += [v for state in workload.optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor)]
    return {local(t).untyped_storage().data_ptr() for t in tensors}


def _rank(rank: int, world: int, cases: list[tuple[str, int, int]], tracked: int
          ) -> dict[str, Any]:
    """Every case on this rank, each measured by the allocator over its last step; case
    ``tracked`` also by FSDPMemTracker over one more step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    results: dict[str, Any] = {}
    for index, (name, microbatch_size, microbatches) in enumerate(cases):
        if name.startswith(ZERO1_CASE):
            results[str(index)] = _zero1_rank(rank, world, name, microbatch_size, microbatches)
            torch.distributed.barrier()
            continue
        if name.startswith("pipeline"):
            results[str(index)] = _pipeline_rank(rank, world, name, microbatch_size,
                                                 microbatches)
            torch.distributed.barrier()
            continue
        factory, blocks = FACTORIES[name]
        tracker = None
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            torch.manual_seed(0)
            workload = factory(microbatch_size)
            fsdp.shard(workload, blocks)
            step = fsdp.sharded_step(workload, microbatches)
            for number in range(STEPS):
                with record_function(f"step {number}"):
                    step()
            if index == tracked:
                # A step of its own: inside the measured one, it holds a unit's buffer longer.
                tracker = _tracker(workload)
                with tracker:
                    step()
        upper, lower = _allocator_peak(profiler, f"step {STEPS - 1}", _live_pointers(workload))
        results[str(index)] = {"allocator": upper, "lower": lower}
        if tracker is not None:
            snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
            results[str(index)]["tracker"] = int(snapshot["Total"])
        del profiler, workload, step, tracker
        torch.distributed.barrier()
    return results


ZERO1_CASE = "ZeRO-1 "
"""Cases named ``ZeRO-1 <model>``: DDP with ZeroRedundancyOptimizer, built on each rank as
``memprop distribute --run`` builds it (``Strategy.build_rank``)."""


def _zero1_candidate(world: int, microbatch_size: int, microbatches: int) -> Any:
    from memprop.distribute import Candidate

    return Candidate(strategy="zero1", devices=world, microbatches=microbatches,
                     microbatch_size=microbatch_size, fits=True, predicted_step_s=0.0, ranks=(),
                     least_budget_bytes=0)


def _zero1_rank(rank: int, world: int, name: str, microbatch_size: int, microbatches: int
                ) -> dict[str, Any]:
    """This rank's ZeRO-1 step, the allocator's peak over its last; and the element counts of
    the parameters its ZeroRedundancyOptimizer steps (torch's own partition)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from memprop.distribute.strategies import REGISTRY

    factory, _ = FACTORIES[name.removeprefix(ZERO1_CASE)]
    candidate = _zero1_candidate(world, microbatch_size, microbatches)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler, \
            REGISTRY["zero1"].build_rank(factory, candidate, rank) as built:
        for number in range(STEPS):
            with record_function(f"step {number}"):
                built.step()
        known = {t.untyped_storage().data_ptr() for t in built.held()}
        local = built.loop.optimizer.optim  # type: ignore[union-attr]
        stepped = sorted(p.numel() for group in local.param_groups for p in group["params"])
    upper, lower = _allocator_peak(profiler, f"step {STEPS - 1}", known)
    return {"allocator": upper, "lower": lower, "share": stepped}


def _zero1_predicted(name: str, microbatch_size: int, microbatches: int, world: int
                     ) -> tuple[list[int], list[list[int]]]:
    """Every rank's predicted peak (``memprop.distribute``, a link given: nothing launched)
    and the element counts of each rank's share as memprop assigns them."""
    from memprop.distribute import distribute
    from memprop.distribute.strategies.zero1 import shares

    factory, _ = FACTORIES[name.removeprefix(ZERO1_CASE)]
    [candidate] = distribute(factory, batch_size=world * microbatches * microbatch_size,
                             devices=world, microbatches=(microbatches,),
                             strategies=("zero1",), link=(1e9, 1e-5), calibrate=False
                             ).candidates
    with fake_mode():
        workload = factory(microbatch_size)
    assert workload.optimizer is not None
    sizes = [p.numel() for group in workload.optimizer.param_groups for p in group["params"]]
    assigned = [sorted(sizes[i] for i in share) for share in shares(sizes, world)]
    return [r.predicted_peak_bytes for r in candidate.ranks], assigned


def _chain_excess(name: str, microbatch_size: int, microbatches: int) -> int:
    """What the planner's chain model adds to the peak of the trace it is made from, on the
    single-device step (0 on the MLPs; 256 B on this Hugging Face Llama, the planner's to
    explain): every candidate's prediction carries it, whatever the strategy."""
    from memprop.plan.chain import Chain
    from memprop.plan.schedule import flat, simulate
    from memprop.trace.profile import trace_chain

    factory, _ = FACTORIES[name.removeprefix(ZERO1_CASE)]
    with fake_mode():
        workload = factory(microbatch_size)
    workload.set_to_none = microbatches == 1
    costs = trace_chain(workload, fake=True)
    chain = Chain.from_chain_costs(costs, cost_model="flops", device="cpu")
    return simulate(chain, flat(len(chain))).peak_bytes - costs.traced_peak_bytes


PIPELINES: dict[str, tuple[Callable[[int], Workload], str]] = {
    "pipeline BatchNorm MLP": (batch_norm_mlp, "1F1B"),
    "pipeline seed MLP": (seed_mlp, "GPipe"),
    "pipeline wide head": (wide_head, "1F1B"),
}
"""Pipelines (``torch.distributed.pipelining``, one stage per rank, the items cut evenly).
Not the conv net: oneDNN's ``convolution_backward`` allocates scratch inside the op, about two
activations' worth at 32x32, which no dispatch-level ledger sees (7% of its first stage)."""


EXACT_SLACK_BYTES = 64
"""What the allocator counts above an exact prediction: c10d's scalars (a few bytes each)."""
DDP_SLACK_BYTES = 256
"""Above an exact ZeRO-1 prediction: c10d's scalars and the small blocks DDP's all-reduce
makes as gloo's thread keeps up or not (seen: 0 to 124 B)."""
PIPELINE_SCRATCH: dict[tuple[str, int], Callable[[int], int]] = {
    # The BatchNorm MLP's first stage peaks inside native_batch_norm_backward, which allocates
    # a block the size of its input (microbatch x 256 floats) besides its outputs: scratch no
    # dispatch-level ledger sees. Measured here; memprop reads that much low on that rank.
    ("pipeline BatchNorm MLP", 0): lambda microbatch_size: microbatch_size * 256 * 4,
}


def _pipeline_shape(name: str, microbatches: int, world: int) -> Any:
    from memprop.distribute import pipeline as pp

    factory, schedule = PIPELINES[name]
    with fake_mode():
        items = pp.sequential_items(factory(2 * microbatches))
    assert not isinstance(items, str), items
    return pp.PipelineShape(schedule=schedule, ranks=world, microbatches=microbatches,
                            bounds=pp.split_points([1.0] * len(items), world))


def _pipeline_predicted(name: str, microbatch_size: int, microbatches: int, world: int,
                        rank: int) -> int:
    from memprop.distribute import pipeline as pp

    factory, _ = PIPELINES[name]
    shape = _pipeline_shape(name, microbatches, world)
    with fake_mode():
        torch.manual_seed(0)
        whole = factory(microbatch_size * microbatches)
        items = pp.sequential_items(whole)
        assert not isinstance(items, str)
        return pp.rank_peak_bytes(whole, items, shape, rank)


def _pipeline_rank(rank: int, world: int, name: str, microbatch_size: int, microbatches: int
                   ) -> dict[str, Any]:
    """This rank's stage run by torch's schedule, the allocator's peak over its last step."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import get_schedule_class
    from torch.profiler import ProfilerActivity, profile, record_function

    from memprop.distribute import pipeline as pp
    from memprop.loop import remade_optimizer

    factory, schedule_name = PIPELINES[name]
    shape = _pipeline_shape(name, microbatches, world)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        torch.manual_seed(0)
        workload = factory(microbatch_size * microbatches)
        items = pp.sequential_items(workload)
        assert not isinstance(items, str)
        module = pp.stage_modules(items, shape)[rank]
        optimizer = remade_optimizer(workload, list(module.parameters()))
        # The rank holds its own stage only: the other items' storages are let go (the
        # workload, built whole, would keep them).
        workload.optimizer = None
        mine = range(shape.bounds[rank], shape.bounds[rank + 1])
        for position, item in enumerate(items):
            if position not in mine:
                item.to("meta")
        inputs = workload.inputs if rank == 0 else ()
        targets = workload.targets if rank == world - 1 else None
        workload.inputs, workload.targets = (), None
        stage = PipelineStage(module, rank, world, torch.device("cpu"))
        assert optimizer is not None and workload.loss_fn is not None
        schedule = get_schedule_class(schedule_name)(stage, n_microbatches=microbatches,
                                                     loss_fn=workload.loss_fn)
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            if rank == 0:
                schedule.step(*inputs)
            elif rank == world - 1:
                schedule.step(target=targets, losses=[])
            else:
                schedule.step()
            optimizer.step()

        for number in range(STEPS):
            with record_function(f"step {number}"):
                step()
    known = {t.untyped_storage().data_ptr() for t in (
        *module.parameters(), *module.buffers(), *inputs, targets,
        *(v for state in optimizer.state.values() for v in state.values()
          if isinstance(v, torch.Tensor)),
        *(p.grad for p in module.parameters() if p.grad is not None),
        *(info.buffer for kept in (*stage.args_recv_info.values(),
                                   *stage.grad_recv_info.values())
          for info in kept if getattr(info, "buffer", None) is not None),
        *stage.output_chunks) if t is not None}
    upper, lower = _allocator_peak(profiler, f"step {STEPS - 1}", known)
    return {"allocator": upper, "lower": lower}


def _tracker(workload: Workload) -> Any:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    tracker = FSDPMemTracker(workload.model, workload.optimizer)
    tracker.track_inputs((*workload.input_tensors, workload.targets))
    return tracker


def _within(figure: int, lower: int, upper: int) -> bool:
    """Whether ``figure`` lies in the allocator's range, give or take TOLERANCE."""
    return lower * (1 - TOLERANCE) <= figure <= upper * (1 + TOLERANCE)


def _check(world: int, cases: list[tuple[str, int, int]], tracked: int = -1) -> None:
    measured = spawn(_rank, world, "gloo", (cases, tracked))
    failures: list[str] = []
    bounded: list[str] = []
    exact: list[str] = []
    for index, (name, microbatch_size, microbatches) in enumerate(cases):
        if name.startswith(ZERO1_CASE):
            peaks, assigned = _zero1_predicted(name, microbatch_size, microbatches, world)
            excess = _chain_excess(name, microbatch_size, microbatches)
        for rank in range(world):
            if name.startswith(ZERO1_CASE):
                figure = measured[rank][str(index)]
                label = (f"{name} {world} ranks {microbatches}x{microbatch_size} rank {rank}: "
                         f"predicted {peaks[rank]:,} B, allocator {figure['allocator']:,} B"
                         + (f" (the chain model's own {excess:,} B over its trace)"
                            if excess else ""))
                exact.append(label)
                # torch's partition is the one memprop predicted with, and the step is exact
                # but for c10d's scalars; gloo frees nothing late in DDP's step.
                real = figure["allocator"]
                if (figure["share"] != assigned[rank] or figure["lower"] != real
                        or not 0 <= real - (peaks[rank] - excess) <= DDP_SLACK_BYTES):
                    failures.append(label + f" (shares {figure['share']} against "
                                            f"{assigned[rank]})")
                continue
            if name.startswith("pipeline"):
                predicted = _pipeline_predicted(name, microbatch_size, microbatches, world,
                                                rank)
            else:
                factory, blocks = FACTORIES[name]
                predicted = fsdp.rank_peak_bytes(factory, microbatch_size, microbatches,
                                                 world, rank, blocks)
            figure = measured[rank][str(index)]
            real, lower = figure["allocator"], figure["lower"]
            late = lower < real
            label = (f"{name} {world} ranks {microbatches}x{microbatch_size} rank {rank}: "
                     f"predicted {predicted:,} B, allocator {real:,} B")
            if late:
                label += f" (at least {lower:,} B: a free out of the profiler's sight)"
            if name.startswith("pipeline") and not late:
                # The replay is exact (a few bytes of c10d's scalars) but for a kernel's own
                # scratch, stated in PIPELINE_SCRATCH.
                scratch = PIPELINE_SCRATCH.get((name, rank), lambda size: 0)(microbatch_size)
                if not 0 <= real - predicted - scratch <= EXACT_SLACK_BYTES:
                    failures.append(label + f" (a kernel's scratch {scratch:,} B)")
            elif not _within(predicted, lower, real):
                # When gloo's worker let a buffer go after FSDP2 did, at a time the profiler
                # cannot see, the real peak is only known to lie between two figures, and so must
                # the prediction (NOTE [ Predicting FSDP2 with a fake process group ]).
                failures.append(label)
            if late:
                bounded.append(label)
            if "tracker" in figure and not _within(figure["tracker"], lower, real):
                failures.append(label + f"; FSDPMemTracker {figure['tracker']:,} B")
    print("\n".join(["exact:", *exact, "only a range measured:", *bounded]))
    assert not failures, "\n".join(failures)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fsdp2_zero1_and_pipelines_on_two_ranks_equal_the_allocator() -> None:
    _check(2, [("residual MLP", 64, 1), ("residual MLP", 64, 2), ("seed MLP", 16, 8),
               ("conv net", 16, 2), ("Llama", 8, 1), ("pipeline BatchNorm MLP", 32, 2),
               ("pipeline seed MLP", 32, 4), ("pipeline wide head", 32, 2),
               ("ZeRO-1 residual MLP", 64, 1), ("ZeRO-1 Llama", 8, 2),
               ("ZeRO-1 seed MLP", 16, 1)], tracked=4)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fsdp2_and_zero1_on_four_ranks_equal_the_allocator() -> None:
    _check(4, [("residual MLP", 32, 2), ("seed MLP", 32, 4), ("Llama", 2, 4),
               ("ZeRO-1 residual MLP", 32, 2)])
