"""What recomputation costs: the three cost models, and the machine rates one of them prices by.

- ``roofline`` (the default): an op costs its FLOPs at this machine's measured matmul rate plus
  the bytes it reads and writes at its measured copy rate, ``t = flops / F + bytes / B``. It
  prices what FLOPs alone call free (ReLU, BatchNorm, pooling, softmax: memory-bound work that
  takes most of a recomputation's time on a CPU), and it is the same on every run of one
  machine: the rates are measured once and kept in a cache file. On a CPU, a pointwise op may
  cost far more than its bytes (tanh 30x a copy of the same bytes on one core here, erf 16x,
  exp 13x): each pointwise call the model makes is timed once on this machine
  (:func:`pointwise_seconds`, cached too), and what it takes beyond its bytes is added per
  element.
- ``flops``: counted floating-point operations (``torch.utils.flop_counter``'s formulas): the
  same plan on every machine, blind to memory-bound work.
- ``measured``: the stages' own times on real steps (a real trace; timings vary from run to
  run, so plans may too).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from memprop.errors import UsageError
from memprop.trace.ledger import Probe

__all__ = ["COST_MODELS", "Rates", "check_cost_model", "machine_rates", "pointwise_seconds"]

COST_MODELS: tuple[str, ...] = ("roofline", "flops", "measured")
DEFAULT_COST_MODEL = "roofline"
T = TypeVar("T")


def on_fake_tensors(cost_model: str) -> str:
    """The cost model a fake trace prices by in place of ``cost_model``: ``measured`` needs
    real steps' times, which later shapes (planned on fake tensors) do not have."""
    return DEFAULT_COST_MODEL if cost_model == "measured" else cost_model


def check_cost_model(cost_model: str) -> None:
    if cost_model not in COST_MODELS:
        raise UsageError(f"cost model {cost_model!r} does not exist: use one of "
                         f"{', '.join(COST_MODELS)}")


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

    def seconds(self, flops: float, moved_bytes: float, ops: int = 0) -> float:
        return flops / self.flops_per_s + moved_bytes / self.bytes_per_s + ops * self.op_s

    def describe(self) -> str:
        return (f"{self.flops_per_s / 1e9:.1f} GFLOP/s and {self.bytes_per_s / 1e9:.1f} GB/s, "
                f"{self.op_s * 1e6:.1f} us to launch an op, {self.selective_op_s * 1e6:.0f} us "
                f"per op under a selective policy ({self.source})")


NOMINAL_CUDA = Rates(flops_per_s=50e12, bytes_per_s=1.5e12, op_s=10e-6, selective_op_s=40e-6,
                     source="nominal for a data-centre GPU: no CUDA device to measure here")
"""For plans made on fake CUDA tensors on a machine without a GPU."""


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "memprop" / "rates.json"


def machine_key(device: str) -> str:
    """What identifies this machine's measurements of ``device``: its name, threads, torch."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return f"{device}|{name}|torch {torch.__version__}"


def machine_rates(device: str = "cpu") -> Rates:
    """This machine's rates for ``device`` (``cpu`` or ``cuda``): read from the cache file, or
    measured (about a second) and written there, so that every plan on this machine prices
    alike."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        return NOMINAL_CUDA
    return remembered(machine_key(kind), lambda: asdict(_measure(kind)),
                      lambda found: Rates(**found))


POINTWISE_ELEMENTS = 1 << 16
"""Elements of the tensors a pointwise call is timed on: enough to leave the call's overhead
behind, small enough to time dozens of calls in a blink."""


def pointwise_seconds(device: str, probes: Iterable[Probe], rates: Rates) -> dict[Probe, float]:
    """For each pointwise call (``memprop.trace.ledger.Probe``), the seconds per element it
    takes on this machine beyond what its bytes cost at ``rates``: read from the cache file,
    or timed (tensors of ``POINTWISE_ELEMENTS`` elements in (0.05, 0.95), where every such op is
    defined) and written there. Only on the CPU: on a GPU pointwise work is bound by memory,
    which the roofline's bytes price already."""
    wanted = set(probes)
    if torch.device(device).type != "cpu" or not wanted:
        return dict.fromkeys(wanted, 0.0)
    cached = read_cache()
    table = cached.setdefault(machine_key("cpu") + "|pointwise", {})
    found, missing = {}, []
    for probe in wanted:
        key = json.dumps(probe)
        if isinstance(table.get(key), (int, float)):
            found[probe] = float(table[key])
        else:
            missing.append(probe)
    for probe in missing:
        found[probe] = table[json.dumps(probe)] = _excess(probe, rates)
    if missing:
        write_cache(cached)
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


def remembered(key: str, measure: Callable[[], Any], load: Callable[[Any], T]) -> T:
    """What ``measure()`` found on this machine under ``key``, kept in the cache file: loaded
    from there when it is (``load`` refuses, with a TypeError, KeyError or ValueError, what an
    older memprop measured differently), else measured and written."""
    cached = read_cache()
    if key in cached:
        with contextlib.suppress(TypeError, KeyError, ValueError):
            return load(cached[key])
    cached[key] = measure()
    write_cache(cached)
    return load(cached[key])


def read_cache() -> dict[str, Any]:
    """Everything measured on this machine so far, by key (``machine_key``)."""
    return _read(_cache_file())


def write_cache(cached: dict[str, Any]) -> None:
    """Write the cache back; an unwritable one costs a measurement per process, no more."""
    from memprop.report.output import write_output

    with contextlib.suppress(UsageError, OSError):
        write_output(_cache_file(), json.dumps(cached, indent=2) + "\n")


def _read(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


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
                 source=f"measured on this {kind} on {when}, cached in {_cache_file()}")


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
