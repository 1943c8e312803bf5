"""What recomputation costs: the three cost models, and the machine rates one of them prices by.

- ``roofline`` (the default): an op costs its FLOPs at this machine's measured matmul rate plus
  the bytes it reads and writes at its measured copy rate, ``t = flops / F + bytes / B``. It
  prices what FLOPs alone call free (ReLU, BatchNorm, pooling, softmax: memory-bound work that
  takes most of a recomputation's time on a CPU), and it is the same on every run of one
  machine: the rates are measured once and kept in a cache file.
- ``flops``: counted floating-point operations (``torch.utils.flop_counter``'s formulas): the
  same plan on every machine, blind to memory-bound work.
- ``measured``: the stages' own times on real steps (a real trace; timings vary from run to
  run, so plans may too).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from memprop.errors import UsageError

__all__ = ["COST_MODELS", "Rates", "check_cost_model", "machine_rates"]

COST_MODELS: tuple[str, ...] = ("roofline", "flops", "measured")
DEFAULT_COST_MODEL = "roofline"


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
    selective_op_s: float
    """What torch's selective checkpoint policy adds per op of a block it runs under (its
    Python dispatch modes, in the first run and in the re-run together)."""
    source: str
    """Where the figures come from: measured here (when), or nominal."""

    def seconds(self, flops: float, moved_bytes: float) -> float:
        return flops / self.flops_per_s + moved_bytes / self.bytes_per_s

    def describe(self) -> str:
        return (f"{self.flops_per_s / 1e9:.1f} GFLOP/s and {self.bytes_per_s / 1e9:.1f} GB/s, "
                f"{self.selective_op_s * 1e6:.0f} us per op under a selective policy "
                f"({self.source})")


NOMINAL_CUDA = Rates(flops_per_s=50e12, bytes_per_s=1.5e12, selective_op_s=40e-6,
                     source="nominal for a data-centre GPU: no CUDA device to measure here")
"""For plans made on fake CUDA tensors on a machine without a GPU."""


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "memprop" / "rates.json"


def _machine_key(device: str) -> str:
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
    path = _cache_file()
    key = _machine_key(kind)
    cached = _read(path)
    try:
        return Rates(**cached[key])
    except (KeyError, TypeError):
        pass  # not measured yet here, or by a memprop that measured other things
    rates = _measure(kind)
    cached[key] = asdict(rates)
    try:
        from memprop.report.output import write_output

        write_output(path, json.dumps(cached, indent=2) + "\n")
    except UsageError:
        pass  # an unwritable cache costs a measurement per process, nothing else
    return rates


def _read(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _measure(kind: str) -> Rates:
    device = torch.device(kind)

    def best_of(run: Any, repeats: int) -> float:
        run()  # warm up
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

    size = 1024 if kind == "cpu" else 8192
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    flops = 2 * size**3 / best_of(lambda: a @ b, 3)
    source = torch.empty(16 * 2**20, device=device)  # 64 MiB
    target = torch.empty_like(source)
    moved = 2 * source.numel() * source.element_size()
    bandwidth = moved / best_of(lambda: target.copy_(source), 5)
    when = time.strftime("%Y-%m-%d")
    return Rates(flops_per_s=float(f"{flops:.3g}"), bytes_per_s=float(f"{bandwidth:.3g}"),
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
