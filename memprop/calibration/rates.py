"""This machine's speed, measured once and cached: what the roofline cost model prices by
(``memprop.plan.costs``) and what distribute's step-time model borrows.

- :class:`Rates`: a large matrix product's FLOP rate, a large copy's byte rate, an op's launch
  and a selective policy's overhead per op, measured (:func:`measure_rates`) and kept in the
  cache file (``memprop.calibration.cache``) under :func:`machine_key`.
- :func:`pointwise_seconds`: on a CPU, a pointwise op may cost far more than its bytes (tanh
  30x a copy of the same bytes on one core here, erf 16x, exp 13x): each pointwise call a
  model makes (a :data:`Probe`, as the ledger records it) is timed once on this machine, and
  what it takes beyond its bytes is kept per element.

This module sits below tracing, planning and distributing: it imports none of them.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from memprop.calibration.cache import (
    cache_file,
    checked_number,
    locked,
    read_cache,
    remembered,
    warn,
    write_cache,
)
from memprop.errors import UsageError

__all__ = ["NOMINAL_CUDA", "Probe", "Rates", "calibrate", "machine_key", "machine_rates",
           "measure_rates", "pointwise_seconds"]

Probe = tuple[str, tuple[Any, ...], tuple[tuple[str, Any], ...]]
"""A pointwise op's call, as the ledger records it and :func:`pointwise_seconds` times it: the
op's name, its positional arguments and its keyword ones (``(name, value)`` pairs, sorted), each
tensor as ``("tensor", dtype, whole)`` (``whole``: as many elements as the output; else
broadcast from one), anything else as its value."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Rates:
    """How fast a device computes and moves memory, for the roofline cost model."""

    flops_per_s: float
    """Floating-point operations per second of a large float32 matrix product."""
    bytes_per_s: float
    """Bytes read and written per second by a large copy."""
    op_s: float
    """What launching an op costs, whatever its size (the dispatcher, Python, a kernel
    launch): what small steps are made of."""
    selective_op_s: float
    """What torch's selective checkpoint policy adds per op of a block it runs under (its
    Python dispatch modes, in the first run and in the re-run together)."""
    source: str
    """Where the figures come from: measured here (when), or nominal."""

    @classmethod
    def from_cached(cls, found: Any) -> Rates:
        """The rates a cache entry holds, each checked against what a device can plausibly do
        (NOTE [ A cache is input ] in ``memprop.calibration.cache``): a ``ValueError`` or
        ``TypeError`` says what is wrong."""
        if not isinstance(found, dict):
            raise TypeError(f"the entry is {type(found).__name__}, not an object")
        numbers = {name: checked_number(found.get(name), name, low, high)
                   for name, (low, high) in _PLAUSIBLE.items()}
        source = found.get("source")
        if not isinstance(source, str):
            raise TypeError(f"source is {source!r}, not text")
        return cls(**numbers, source=source)

    def seconds(self, flops: float, moved_bytes: float, ops: int = 0) -> float:
        return flops / self.flops_per_s + moved_bytes / self.bytes_per_s + ops * self.op_s

    def describe_speed(self) -> str:
        return f"{self.flops_per_s / 1e9:.1f} GFLOP/s and {self.bytes_per_s / 1e9:.1f} GB/s"

    def describe(self) -> str:
        return (f"{self.flops_per_s / 1e9:.1f} GFLOP/s and {self.bytes_per_s / 1e9:.1f} GB/s, "
                f"{self.op_s * 1e6:.1f} us to launch an op, {self.selective_op_s * 1e6:.0f} us "
                f"per op under a selective policy ({self.source})")


_PLAUSIBLE: dict[str, tuple[float, float]] = {
    "flops_per_s": (1e6, 1e18),  # a slow core's scalar loop .. a thousand times today's GPUs
    "bytes_per_s": (1e6, 1e16),
    "op_s": (1e-9, 1.0),
    "selective_op_s": (0.0, 1.0),
}
"""What a cached rate may be, by field: anything outside is not a measurement of a device."""

NOMINAL_CUDA = Rates(flops_per_s=50e12, bytes_per_s=1.5e12, op_s=10e-6, selective_op_s=40e-6,
                     source="nominal for a data-centre GPU: no CUDA device to measure here")
"""For plans made on fake CUDA tensors on a machine without a GPU."""


def machine_key(device: str) -> str:
    """What identifies this machine's measurements of ``device``: its name, threads, torch."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return f"{device}|{name}|torch {torch.__version__}"


def machine_rates(device: str = "cpu") -> Rates:
    """This machine's rates for ``device`` (``cpu`` or ``cuda``): read from the cache file, or
    measured (a few seconds, :func:`measure_rates`) and written there, so that every plan on
    this machine prices alike. A cache entry that is not a plausible measurement is measured
    again, with a warning (NOTE [ A cache is input ] in ``memprop.calibration.cache``)."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        return NOMINAL_CUDA
    return remembered(machine_key(kind), lambda: asdict(measure_rates(kind)), Rates.from_cached)


def calibrate(device: str = "cpu", *, fresh: bool = False) -> tuple[Rates, Rates | None]:
    """Measure ``device``'s rates again on purpose (``memprop calibrate``), write them to the
    cache and drop the pointwise timings, which the next plan re-times at the new rates. Each
    figure kept is the best of this measurement and the cached one (a busy machine only slows a
    measurement down), unless ``fresh``: then the new measurement replaces the cached one
    outright (the machine changed). Returns the rates now cached and the ones the cache held
    (``None`` when it held none that could be used). Raises :class:`UsageError` for a device
    this machine cannot measure."""
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"cannot calibrate device {device!r}: give cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("cannot calibrate cuda: this machine has no CUDA device (plans on fake "
                         "CUDA tensors price by nominal data-centre rates)")
    key = machine_key(kind)
    with locked():
        cached = read_cache()
        try:
            previous: Rates | None = Rates.from_cached(cached.get(key))
        except (TypeError, ValueError):
            previous = None
        rates = measure_rates(kind, previous)
        if previous is not None and not fresh:
            best = _best([rates, previous])
            assert best is not None
            if best != replace(rates, source=best.source):
                rates = replace(best, source=f"{rates.source}; the faster figures measured "
                                             "before kept")
        cached[key] = asdict(rates)
        cached.pop(f"{key}|pointwise", None)
        write_cache(cached)
    return rates, previous


MEASURE_ROUNDS = 3
"""Rounds of measurement, each itself the best of several runs: two agreeing rounds end it."""
AGREEMENT = 0.1
"""Rounds (or a round and the previous measurement) within this fraction of each other agree."""


def measure_rates(kind: str, previous: Rates | None = None) -> Rates:
    """The rates of ``kind`` measured now: each figure the best of its runs in each round and
    the best over rounds (a busy machine only ever slows a run down, so the fastest is the
    machine's own), rounds repeated until two agree (or ``MEASURE_ROUNDS``). A measurement
    slower than ``previous`` beyond ``AGREEMENT`` says so in its ``source``."""
    rounds = [_measure(kind)]
    while len(rounds) < MEASURE_ROUNDS and not _agree(rounds[-1], _best(rounds[:-1]) or
                                                      (previous if len(rounds) == 1 else None)):
        rounds.append(_measure(kind))
    rates = _best(rounds)
    assert rates is not None
    note = ""
    if previous is not None and _slower(rates, previous):
        note = (f"; slower than the {previous.describe_speed()} measured before: the machine "
                f"may be busy ({_load()})")
    elif _busy():
        note = (f"; the machine was busy ({_load()}): run memprop calibrate when it is idle, "
                "which keeps the faster figures")
    return replace(rates, source=f"{rates.source}, best of {len(rounds)} rounds{note}")


def _busy() -> bool:
    """Whether more runnable work than cores was waiting over the last minute."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def _agree(rates: Rates, other: Rates | None) -> bool:
    if other is None:
        return False
    return all(abs(getattr(rates, f) - getattr(other, f)) <= AGREEMENT * getattr(other, f)
               for f in ("flops_per_s", "bytes_per_s", "op_s"))


def _slower(rates: Rates, previous: Rates) -> bool:
    return (rates.flops_per_s < (1 - AGREEMENT) * previous.flops_per_s
            or rates.bytes_per_s < (1 - AGREEMENT) * previous.bytes_per_s)


def _best(rounds: list[Rates]) -> Rates | None:
    """Per figure, the fastest of ``rounds``."""
    if not rounds:
        return None
    fastest = {f.name: (max if f.name.endswith("_per_s") else min)(
        getattr(r, f.name) for r in rounds) for f in fields(Rates) if f.name != "source"}
    return replace(rounds[0], **fastest)


def _load() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "its load is unknown"
    return f"load average {load:.1f} on {os.cpu_count()} cores"


POINTWISE_ELEMENTS = 1 << 16
"""Elements of the tensors a pointwise call is timed on: enough to leave the call's overhead
behind, small enough to time dozens of calls in a blink."""
MAX_POINTWISE_S = 1e-3
"""More seconds per element than any op takes beyond its bytes: a cached figure above is not
a timing."""


def pointwise_seconds(device: str, probes: Iterable[Probe], rates: Rates) -> dict[Probe, float]:
    """For each pointwise call (:data:`Probe`), the seconds per element it
    takes on this machine beyond what its bytes cost at ``rates``: read from the cache file,
    or timed (tensors of ``POINTWISE_ELEMENTS`` elements in (0.05, 0.95), where every such op is
    defined) and written there. Only on the CPU: on a GPU pointwise work is bound by memory,
    which the roofline's bytes price already."""
    wanted = set(probes)
    if torch.device(device).type != "cpu" or not wanted:
        return dict.fromkeys(wanted, 0.0)
    key = machine_key("cpu") + "|pointwise"
    found = _cached_pointwise(read_cache(), key, wanted, quiet=False)
    if len(found) == len(wanted):
        return found
    with locked():
        cached = read_cache()
        found = _cached_pointwise(cached, key, wanted, quiet=True)
        table = cached[key] if isinstance(cached.get(key), dict) else {}
        for probe in wanted - found.keys():
            found[probe] = table[json.dumps(probe)] = _excess(probe, rates)
        cached[key] = table
        write_cache(cached)
    return found


def _cached_pointwise(cached: dict[str, Any], key: str, wanted: set[Probe], *,
                      quiet: bool) -> dict[Probe, float]:
    table = cached.get(key, {})
    if not isinstance(table, dict):
        if not quiet:
            warn(f"{cache_file()} holds {type(table).__name__} for {key!r}, not timings: "
                 "timed again")
        return {}
    found = {}
    for probe in wanted:
        if json.dumps(probe) not in table:
            continue
        value = table[json.dumps(probe)]
        try:
            found[probe] = checked_number(value, "the timing", 0.0, MAX_POINTWISE_S)
        except ValueError as error:
            if not quiet:
                warn(f"{cache_file()} holds an unusable timing of {probe[0]} ({error}): timed "
                     "again")
    return found


def _excess(probe: Probe, rates: Rates) -> float:
    """Seconds per element of ``probe``'s call beyond its bytes at ``rates`` (0 when it cannot
    be called here)."""
    name, positional, keyword = probe
    moved = 0

    def made(value: Any) -> Any:
        nonlocal moved
        if not (isinstance(value, (list, tuple)) and value and value[0] == "tensor"):
            return value
        _, dtype, whole = value
        tensor = (torch.rand(POINTWISE_ELEMENTS if whole else 1) * 0.9 + 0.05).to(
            getattr(torch, dtype))
        moved += tensor.numel() * tensor.element_size()
        return tensor

    try:
        namespace, op, overload = name.split(".")
        func = getattr(getattr(getattr(torch.ops, namespace), op), overload)
        with torch.random.fork_rng(devices=[]):  # the caller's random stream goes on untouched
            args = [made(a) for a in positional]
            kwargs = {key: made(value) for key, value in keyword}
            out = func(*args, **kwargs)
            seconds = _best_of(lambda: func(*args, **kwargs), 5)
    except Exception:  # an op this recipe cannot call: the roofline's bytes alone price it
        return 0.0
    first = out[0] if isinstance(out, (tuple, list)) else out
    moved += first.numel() * first.element_size()
    return max(0.0, float(seconds - moved / rates.bytes_per_s) / POINTWISE_ELEMENTS)


def _best_of(run: Callable[[], Any], repeats: int, kind: str = "cpu") -> float:
    """The fastest of ``repeats`` runs, after one to warm up, in seconds."""
    run()
    times = []
    for _ in range(repeats):
        if kind == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if kind == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def _measure(kind: str) -> Rates:
    with torch.random.fork_rng(devices=[]):  # the caller's random stream goes on untouched
        return _measured_rates(kind)


def _measured_rates(kind: str) -> Rates:
    device = torch.device(kind)
    best_of = functools.partial(_best_of, kind=kind)
    size = 1024 if kind == "cpu" else 8192
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    flops = 2 * size**3 / best_of(lambda: a @ b, 3)
    source = torch.empty(16 * 2**20, device=device)  # 64 MiB
    target = torch.empty_like(source)
    moved = 2 * source.numel() * source.element_size()
    bandwidth = moved / best_of(lambda: target.copy_(source), 5)
    when = time.strftime("%Y-%m-%d")
    tiny = torch.ones(4, device=device)
    launches = 200

    def launched() -> None:
        for _ in range(launches):
            torch.add(tiny, 1.0)

    op_s = best_of(launched, 5) / launches
    return Rates(flops_per_s=float(f"{flops:.3g}"), bytes_per_s=float(f"{bandwidth:.3g}"),
                 op_s=float(f"{op_s:.3g}"),
                 selective_op_s=float(f"{_selective_overhead(device, best_of):.3g}"),
                 source=f"measured on this {kind} on {when}, cached in {cache_file()}")


def _selective_overhead(device: torch.device, best_of: Any) -> float:
    """Seconds per op that a selective policy adds to a checkpoint's first run and re-run,
    from tiny blocks of a transformer's ops (views, a linear layer, a norm, an activation, a
    residual add) checkpointed with and without one, forward and backward."""
    from torch.nn import functional
    from torch.utils import checkpoint as torch_checkpoint
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.ones(2, 4, device=device, requires_grad=True)
    weight = torch.ones(4, 4, device=device, requires_grad=True)

    def blocks(t: torch.Tensor) -> torch.Tensor:
        for _ in range(25):
            h = functional.layer_norm(t, (4,))
            h = functional.gelu(functional.linear(h.view(1, 2, 4), weight)).view(2, 4)
            t = t + h
        return t

    class Counter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            Counter.ops += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Counter():
        blocks(x)

    def recompute_all(context: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return torch_checkpoint.CheckpointPolicy.PREFER_RECOMPUTE

    def step(context_fn: Any) -> None:
        torch_checkpoint.checkpoint(blocks, x, use_reentrant=False,
                                    context_fn=context_fn).sum().backward()

    plain = best_of(lambda: step(torch_checkpoint.noop_context_fn), 7)
    selective = best_of(lambda: step(functools.partial(
        torch_checkpoint.create_selective_checkpoint_contexts, recompute_all)), 7)
    return max(0.0, float(selective - plain) / Counter.ops)
