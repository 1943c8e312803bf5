"""Run the candidates on ``torch.distributed`` and measure every rank: one launch of the
largest number of ranks any candidate uses, every candidate run in turn (a launch costs
seconds; a candidate on fewer ranks runs on the first ones while the others wait).

Each rank builds its own workload from the factory (seeded alike) and the candidate's
strategy builds, runs and measures it there (``Strategy.run_rank``, NOTE [ One contract for a
strategy ] in ``memprop.distribute.strategy``): ``steps`` steps, the last counted by the ledger
and by the allocator (:func:`measured`): the steady state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from memprop.errors import MemPropError, UsageError
from memprop.workload import Workload

__all__ = ["LaunchInterrupted", "available_cores", "device_of", "measure", "measured",
           "spawn"]

LAUNCH_TIMEOUT_S = 900.0


def measure(factory: Any, candidates: list[Any], *, steps: int, backend: str) -> list[Any]:
    """``candidates`` with every rank's measured peaks (the ledger's and the allocator's) and
    rank 0's step time (the fastest of its timed steps)."""

    world = max(c.devices for c in candidates)
    results = spawn(_run_candidates, world, backend, (factory, candidates, steps))
    measured = []
    for index, candidate in enumerate(candidates):
        ranks = tuple(dataclasses.replace(
            rank, measured_peak_bytes=results[rank.rank][str(index)]["peak_bytes"],
            allocator_peak_bytes=results[rank.rank][str(index)].get("allocator_peak_bytes"))
            for rank in candidate.ranks)
        measured.append(dataclasses.replace(candidate, ranks=ranks,
                                            measured_step_s=results[0][str(index)]["step_s"]))
    return measured


class LaunchInterrupted(MemPropError):
    """The launch was stopped by a signal (Ctrl-C, SIGTERM): every rank stopped, nothing
    written; the exit code is the shell's, 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}: every rank of the launch was stopped, nothing "
                         "was written")
        self.exit_code = 128 + signum


def available_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def spawn(target: Callable[..., dict[str, Any]], world: int, backend: str,
          args: tuple[Any, ...]) -> list[dict[str, Any]]:
    """``target(rank, world, *args)`` in ``world`` spawned processes joined in one process
    group on ``backend`` (one thread each per share of this machine's cores): what each
    returned, by rank.

    NOTE [ Stopping a launch ]
    The ranks are watched, not joined in turn: the first rank that fails (its own exception,
    the earliest raised, or a signal that killed it) stops the others at once, and is the
    one-line error. SIGINT and SIGTERM to this process stop every rank (terminated, then
    killed after ``STOP_GRACE_S``) and raise :class:`LaunchInterrupted`; a rank dies with this
    process if it is killed outright (``PR_SET_PDEATHSIG``). Ranks ignore SIGINT: Ctrl-C reaches
    the whole process group, and this process decides."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder, _signals_raised() as signals:
        port = _free_port()
        processes = [context.Process(target=_in_group, args=(
            target, rank, world, port, backend, folder, args), daemon=True)
            for rank in range(world)]
        try:
            with _imports_as_here():
                for process in processes:
                    process.start()
            failed = _watch(processes, time.monotonic() + LAUNCH_TIMEOUT_S)
        except _Signalled as signalled:
            signals.armed = False
            _stop(processes)
            raise LaunchInterrupted(signalled.signum) from None
        finally:
            signals.armed = False
            _stop(processes)
        if signals.received:
            raise LaunchInterrupted(signals.received[0])
        results = [_read(Path(folder) / f"rank{r}.json") for r in range(world)]
        said = [_last_line(Path(folder) / f"rank{r}.log") for r in range(world)]
    if failed is not None:
        raise UsageError(_failure(processes, results, failed, said))
    return results


STOP_GRACE_S = 3.0
"""Seconds a rank has to end after SIGTERM before it is killed."""


class _Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGINT and SIGTERM noted while a launch runs, and raised as :class:`_Signalled` while
    ``armed`` (from the main thread only, where Python delivers signals)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.armed = True

    def handle(self, signum: int, frame: Any) -> None:
        first = not self.received
        self.received.append(signum)
        if first and self.armed:
            raise _Signalled(signum)


@contextlib.contextmanager
def _signals_raised() -> Iterator[_Signals]:
    """:class:`_Signals` installed for SIGINT and SIGTERM; the handlers put back after."""
    import threading

    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    previous = {s: signal.signal(s, signals.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signals
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def _imports_as_here() -> Iterator[None]:
    """The ranks import memprop, its CLI and torch from where this process did: a spawned
    process starts on this one's ``sys.path``, on which a factory's folder comes first (as
    ``python`` puts a script's), and a folder holding a checkout named ``memprop`` beside the
    factory would shadow the installed one."""
    import sys

    homes = []
    for name in ("memprop", "memprop_cli", "torch"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            homes.append(str(Path(module.__file__).resolve().parent.parent))  # type: ignore[arg-type]
    saved = list(sys.path)
    sys.path[:] = list(dict.fromkeys([*homes, *saved]))
    try:
        yield
    finally:
        sys.path[:] = saved


def _watch(processes: list[Any], deadline: float) -> int | None:
    """Wait until every rank has ended, or one failed (its index), or the deadline."""
    from multiprocessing.connection import wait

    running = {p.sentinel: r for r, p in enumerate(processes)}
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            raise UsageError(f"the launch of {len(processes)} ranks ran past "
                             f"{LAUNCH_TIMEOUT_S:.0f} s: stopped")
        for sentinel in wait(list(running), timeout=min(left, 1.0)):
            rank = running.pop(sentinel)
            processes[rank].join()
            if processes[rank].exitcode != 0:
                return rank
    return None


def _stop(processes: list[Any]) -> None:
    """Every rank still running terminated, then killed if it lingers; all reaped."""
    alive = [p for p in processes if p.pid is not None and p.exitcode is None]
    for process in alive:
        with contextlib.suppress(OSError):
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for process in alive:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in alive:
        if process.exitcode is None:
            with contextlib.suppress(OSError):
                process.kill()
            process.join()


def _failure(processes: list[Any], results: list[dict[str, Any]], first_seen: int,
             said: list[str]) -> str:
    """The first rank that raised, with its own error (the others' errors are usually its
    consequence: a peer gone); else the rank first seen dead, how it died and the last line it
    wrote to its standard error."""
    raised = [(r["raised_at"], rank, r["error"]) for rank, r in enumerate(results)
              if r.get("error") and isinstance(r.get("raised_at"), (int, float))]
    if raised:
        _, rank, error = min(raised)
        return f"rank {rank} of the launch failed: {error}"
    code = processes[first_seen].exitcode
    how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
           and -code in signal.Signals._value2member_map_ else f"exited with status {code}")
    last = f"; its last words: {said[first_seen]}" if said[first_seen] else ""
    return f"rank {first_seen} of the launch {how}, without an error of its own{last}"


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


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


def _die_with_parent() -> None:
    """Linux: this process is killed when the one that spawned it dies (even by SIGKILL)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _in_group(target: Callable[..., dict[str, Any]], rank: int, world: int, port: int,
              backend: str, folder: str, args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # NOTE [ Stopping a launch ]
    _die_with_parent()
    # A rank's standard error goes to a file beside its result, not into memprop's report:
    # torch's own warnings (FSDP2 calls collectives torch deprecates; c10's allocator warns
    # once about blocks made before the meter started) are nothing for the user to act on, and
    # every rank would print them. A rank that dies without an error of its own is reported
    # with the last line it wrote there.
    log = os.open(Path(folder) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 2)
    os.close(log)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # The ranks share this machine's cores: one share each keeps them from contending.
    torch.set_num_threads(max(1, available_cores() // world))
    out = Path(folder) / f"rank{rank}.json"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world)
        results = target(rank, world, *args)
        dist.destroy_process_group()
    except Exception as error:
        said = str(error) if isinstance(error, MemPropError) else (
            f"{type(error).__name__}: {error}")
        out.write_text(json.dumps({"error": said,
                                   "raised_at": time.monotonic()}))
        raise SystemExit(1) from None
    out.write_text(json.dumps(results))


def _run_candidates(rank: int, world: int, factory: Any, candidates: list[Any], steps: int
                    ) -> dict[str, Any]:
    """Every candidate in turn, built and run by its strategy on the ranks it uses; the
    others wait at the barrier."""
    import torch.distributed as dist

    from memprop.distribute.strategies import strategy_of

    results: dict[str, Any] = {}
    for index, candidate in enumerate(candidates):
        if rank < candidate.devices:
            results[str(index)] = strategy_of(candidate).run_rank(factory, candidate, steps,
                                                                  rank)
        dist.barrier()
    return results


def measured(built: Any, steps: int) -> dict[str, Any]:
    """A rank's figures for the launcher (``built``: a ``BuiltRank``): ``steps`` steps timed
    (the fastest after the first, ``step_s``), then one more counted by the ledger
    (``peak_bytes``) and by the allocator (``allocator_peak_bytes``). The gradients are zeroed
    as the rank's loop does before either count starts (the step does it first; NOTE [ What
    c10 reports on the CPU ] in ``memprop.devices.allocator``)."""
    from memprop.devices.allocator import AllocatorMeter
    from memprop.loop import zero_gradients

    step_s = _fastest_step_s(built.step, steps)
    zero_gradients(built.loop)
    counted = built.ledger()
    meter = AllocatorMeter(built.device, built.held())
    with meter, counted:
        built.step()
    return {"peak_bytes": counted.peak()[0], **_allocator(meter, built.held()),
            "step_s": step_s}


def device_of(workload: Workload) -> torch.device:
    return next((p.device for p in workload.model.parameters()),
                workload.input_tensors[0].device)


def _allocator(meter: Any, held_after: list[torch.Tensor]) -> dict[str, int]:
    """The allocator's count of a rank's measured step (``memprop.devices.allocator``), beside
    the ledger's, for the launcher: ``allocator_peak_bytes``, and ``allocator_unaccounted_bytes``,
    what it still counts live after the step beyond the rank's state (frees made on gloo's
    threads, which it is not told of, or what the step leaves held): where it is the former,
    the peak reads high by up to that much."""
    from memprop.devices.allocator import unaccounted_bytes

    result = meter.result
    assert result is not None  # the step ended without an exception
    return {"allocator_peak_bytes": int(result.peak_bytes),
            "allocator_unaccounted_bytes": unaccounted_bytes(result, held_after, meter.device)}


TIMED_STEPS = 10
"""Steps timed after the first (which makes the optimizer's state and the schedule's
buffers), at least: the same number on every rank (their collectives pair up), enough for the
fastest to be one the machine's other work did not interrupt."""


def _fastest_step_s(step: Callable[[], None], steps: int) -> float:
    """Run ``steps`` steps, and ``TIMED_STEPS`` after the first at least: the fastest of all
    but the first. The fastest, as the step-time model's calibration takes it
    (``memprop.distribute.steptime``): the machine's own time, the least disturbed by other
    work on its cores."""
    times = []
    for _ in range(max(steps, TIMED_STEPS + 1)):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times[1:])
