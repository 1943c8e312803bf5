"""Run the candidates on ``torch.distributed`` and measure every rank: one launch of the
largest number of ranks any candidate uses, every candidate run in turn (a launch costs
seconds; a candidate on fewer ranks runs on the first ones while the others wait).

Each rank builds its own workload from the factory (seeded alike), runs ``steps`` steps of
the candidate (``M`` microbatches, DDP's ``no_sync`` until the last, one optimizer step, the
recomputation plan installed when there is one) and measures its last step with the ledger:
the steady state. DDP's gradient buckets exist before the step and are touched only in the
backward, so a communication hook notes them during the first steps and they are put on the
ledger with what else exists before the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from memprop.errors import UsageError
from memprop.workload import Workload

__all__ = ["measure", "spawn"]

LAUNCH_TIMEOUT_S = 900.0


def measure(factory: Any, candidates: list[Any], *, devices: int, steps: int, backend: str
            ) -> list[Any]:
    """``candidates`` with every rank's measured peak and rank 0's median step time."""

    world = max(c.devices for c in candidates)
    results = spawn(_run_candidates, world, backend, (factory, candidates, steps))
    measured = []
    for index, candidate in enumerate(candidates):
        ranks = tuple(dataclasses.replace(rank, measured_peak_bytes=results[rank.rank][
            str(index)]["peak_bytes"]) for rank in candidate.ranks)
        measured.append(dataclasses.replace(candidate, ranks=ranks,
                                            measured_step_s=results[0][str(index)]["step_s"]))
    return measured


def spawn(target: Callable[..., dict[str, Any]], world: int, backend: str,
          args: tuple[Any, ...]) -> list[dict[str, Any]]:
    """``target(rank, world, *args)`` in ``world`` spawned processes joined in one process
    group on ``backend`` (one thread each per share of this machine's cores): what each
    returned, by rank. A rank that fails is a one-line error with its exception."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        port = _free_port()
        processes = [context.Process(target=_in_group, args=(
            target, rank, world, port, backend, folder, args)) for rank in range(world)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        for process in processes:
            process.join(max(1.0, deadline - time.monotonic()))
        failed = [r for r, p in enumerate(processes) if p.exitcode != 0]
        for process in processes:
            if process.is_alive():
                process.kill()
        results = [_read(Path(folder) / f"rank{r}.json") for r in range(world)]
    if failed:
        reason = next((r["error"] for r in results if r and r.get("error")), "no message")
        raise UsageError(f"rank {failed[0]} of the launch failed: {reason}")
    return results


def _read(path: Path) -> dict[str, Any]:
    try:
        found: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _in_group(target: Callable[..., dict[str, Any]], rank: int, world: int, port: int,
              backend: str, folder: str, args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # The ranks share this machine's cores: one share each keeps them from contending.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    out = Path(folder) / f"rank{rank}.json"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world)
        results = target(rank, world, *args)
        dist.destroy_process_group()
    except Exception as error:
        out.write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        raise
    out.write_text(json.dumps(results))


def _run_candidates(rank: int, world: int, factory: Any, candidates: list[Any], steps: int
                    ) -> dict[str, Any]:
    """Every candidate in turn, on the ranks it uses; the others wait at the barrier."""
    import torch.distributed as dist

    results: dict[str, Any] = {}
    for index, candidate in enumerate(candidates):
        if candidate.strategy == "pipeline":
            results[str(index)] = _run_pipeline(factory, candidate, steps, rank)
        elif candidate.strategy == "fsdp":
            results[str(index)] = _run_fsdp(factory, candidate, steps)
        elif rank < candidate.devices:
            results[str(index)] = _run(factory, candidate, steps)
        dist.barrier()
    return results


def _run_fsdp(factory: Any, candidate: Any, steps: int) -> dict[str, Any]:
    """FSDP2 over the candidate's blocks on the launch's group, the last step measured with the
    ledger (the rank's shards, optimizer state and inputs registered before it)."""
    from memprop.distribute import fsdp

    torch.manual_seed(0)
    workload: Workload = factory(candidate.microbatch_size)
    fsdp.shard(workload, candidate.sharded)
    step = fsdp.sharded_step(workload, candidate.microbatches)
    step_s = _median_step_s(step, steps)
    return {"peak_bytes": fsdp.measured_peak(workload, step),
            "step_s": step_s}


def _run_pipeline(factory: Any, candidate: Any, steps: int, rank: int) -> dict[str, Any]:
    """This rank's stages of ``candidate.pipeline`` run by torch's schedule; the last step
    measured with the ledger (what exists before it: the rank's parameters, optimizer state,
    the inputs or targets its stages use, the schedule's receive buffers)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import get_schedule_class

    from memprop.distribute.pipeline import (
        placement,
        rank_ledger,
        sequential_items,
        stage_modules,
    )
    from memprop.loop import remade_optimizer

    shape = candidate.pipeline
    torch.manual_seed(0)
    workload: Workload = factory(candidate.microbatch_size * shape.microbatches)
    items = sequential_items(workload)
    assert not isinstance(items, str), items
    modules = stage_modules(items, shape)
    mine = placement(shape.schedule, shape.ranks)[rank]
    device = workload.inputs[0].device
    stages = [PipelineStage(modules[s], s, shape.stages, device) for s in mine]
    parameters = [p for s in mine for p in modules[s].parameters()]
    optimizer = remade_optimizer(workload, parameters)
    kind = get_schedule_class(shape.schedule)
    schedule = kind(stages[0] if len(stages) == 1 else stages,
                    n_microbatches=shape.microbatches, loss_fn=workload.loss_fn)
    first, last = 0 in mine, shape.stages - 1 in mine

    def step() -> None:
        for parameter in parameters:
            parameter.grad = None
        arguments = workload.inputs if first else ()
        if last:
            schedule.step(*arguments, target=workload.targets, losses=[])
        else:
            schedule.step(*arguments)
        if optimizer is not None:
            optimizer.step()

    step_s = _median_step_s(step, steps)
    ledger = rank_ledger(workload, shape, rank, parameters, optimizer,
                         [info.buffer for stage in stages
                          for kept in (*stage.args_recv_info.values(),
                                       *stage.grad_recv_info.values())
                          for info in kept if info.buffer is not None])
    with ledger:
        step()
    return {"peak_bytes": ledger.peak()[0], "step_s": step_s}


def _run(factory: Any, candidate: Any, steps: int) -> dict[str, Any]:
    from memprop.blocks.install import installed, without_caches
    from memprop.loop import compute_loss
    from memprop.trace.ledger import Category, StorageLedger
    from memprop.trace.step import register_step_state

    torch.manual_seed(0)
    workload: Workload = factory(candidate.microbatch_size)
    model = workload.model
    buckets: list[torch.Tensor] = []
    stepped = workload
    ddp = None
    if candidate.devices > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        # A lambda: DDP checks a hook's annotations, which this module's are strings.
        ddp.register_comm_hook(buckets, lambda state, bucket: _noting_allreduce(state, bucket))
        stepped = dataclasses.replace(workload, model=ddp)
    plan = candidate.plan

    def step() -> None:
        buckets.clear()  # DDP rebuilds its buckets after the first step: note this step's
        for parameter in model.parameters():
            parameter.grad = None  # zero_grad(set_to_none=True), then accumulate
        last = candidate.microbatches - 1
        for m in range(candidate.microbatches):
            quiet = ddp.no_sync() if ddp is not None and m < last else contextlib.nullcontext()
            with quiet:
                output = stepped.forward()
                loss, _ = compute_loss(stepped, output)
                loss.backward()
            if m < last:
                del output, loss
        # The last microbatch's output and loss are held through the optimizer's step, as in
        # memprop's training step (a loop that logs them).
        if workload.optimizer is not None:
            workload.optimizer.step()
        del output, loss

    with contextlib.ExitStack() as stack:
        stack.enter_context(without_caches(model))
        if plan is not None:
            stack.enter_context(installed(model, plan.stage_names, plan.tree, plan.selective))
        step_s = _median_step_s(step, steps)
        ledger = StorageLedger()
        register_step_state(ledger, stepped, training=True)
        ledger.register(buckets, Category.GRADIENTS, "DDP's gradient buckets")
        for parameter in model.parameters():
            parameter.grad = None
        with ledger:
            step()
    return {"peak_bytes": ledger.peak()[0], "step_s": step_s}


def _median_step_s(step: Callable[[], None], steps: int) -> float:
    """Run ``steps`` steps (two at least): the median time of all but the first, which makes
    the optimizer's state and the schedule's buffers."""
    times = []
    for _ in range(max(steps, 2)):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def _noting_allreduce(buckets: list[torch.Tensor], bucket: Any) -> Any:
    """DDP's own all-reduce (torch's ``allreduce_hook``), noting each bucket's buffer."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    if not any(b.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
               for b in buckets):
        buckets.append(buffer)
    return allreduce_hook(cast(Any, None), bucket)  # None: the default process group
