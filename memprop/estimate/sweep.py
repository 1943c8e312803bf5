"""``memprop sweep``: training and inference peaks over a grid of batch sizes and depths.

Every cell is traced inside its own fresh fake-tensor mode, so a cell of hundreds of GiB costs
the time of its trace and nothing else. A real sweep (``real=True``) still traces each cell on
fake tensors first: a cell predicted to exceed the device's available memory is recorded as
``oom`` without being run (on the CPU a real attempt would meet the kernel's OOM killer, not an
exception); the others run for real, and one that raises an out-of-memory error is ``oom`` too.

NOTE [ Affine in batch ]
For a fixed model the training peak is the largest of a handful of moments, each a sum of
fixed bytes (parameters, gradients, optimizer state) and bytes proportional to the batch
(activations, inputs, their gradients). While the same moment is the largest, the peak is
exactly affine, ``fixed + per_example × batch``, and the least-squares line through those cells
has a residual of 0 bytes. Across a range of batch sizes the largest moment can change, and the
peak is then the maximum of several lines (convex, piecewise affine), not one line. The seed MLP
(784 → 1024 × D → 10, SGD) peaks at the end of backward, when every gradient is live, below
batch 392, and early in backward, when the activations are still live, from batch 1024 up (with
a third line between): a sweep over 1, 64, 4096 fits one line with a non-zero residual, and the
cells' ``peak_tick`` shows where the moment changed. The fit is then a summary; fit the cells
past the last change to extrapolate.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import torch

from memprop.blame import (
    is_fake_kernel_refusal,
    is_fake_tensor_limit,
    is_out_of_memory,
    user_code,
)
from memprop.errors import MemPropError, UsageError
from memprop.estimate.preflight import shortfall
from memprop.trace.fake import device_of, new_fake_mode
from memprop.trace.profile import Profile, profile
from memprop.workload import SeedConfig, Workload, call_factory, seed_workload

__all__ = [
    "Build",
    "LineFit",
    "Sweep",
    "SweepCell",
    "factory_builder",
    "fit_line",
    "seed_builder",
    "sweep",
    "trace_fake",
]

SCHEMA_VERSION = 1

Build = Callable[[int, "int | None"], Workload]
"""``build(batch_size, depth)``: a fresh workload of that size. memprop calls it inside a fake
mode for fake cells, so it must create its tensors when called, not capture existing ones."""


def seed_builder(config: SeedConfig) -> Build:
    """The built-in MLP at each size, the other settings taken from ``config``."""

    def build(batch_size: int, depth: int | None) -> Workload:
        return seed_workload(replace(config, batch=batch_size,
                                     depth=config.depth if depth is None else depth))

    return build


def factory_builder(func: Callable[..., Any], *, spec: str) -> Build:
    """A user's factory at each size: ``func(batch_size=B[, depth=D])``."""

    def build(batch_size: int, depth: int | None) -> Workload:
        return call_factory(func, spec=spec, batch_size=batch_size, depth=depth)

    return build


def trace_fake(build: Build, batch_size: int, depth: int | None) -> Profile:
    """The profile of one size, built and traced inside a fresh fake mode: nothing allocated."""
    mode = new_fake_mode()
    with mode, user_code(f"building batch {batch_size}" + (
            "" if depth is None else f" at depth {depth}")):
        workload = build(batch_size, depth)
    return profile(workload)


@dataclass(frozen=True, kw_only=True, slots=True)
class SweepCell:
    """One batch size at one depth."""

    batch_size: int
    depth: int | None
    """None when the workload has no depth to vary (a factory without a ``depth`` argument)."""
    status: str
    """``ok``, ``oom`` (ran out of memory, or predicted to: see ``message``) or ``error``."""
    training_peak_bytes: int | None = None
    """The steady-state step's training peak."""
    first_step_peak_bytes: int | None = None
    """The loop's first step's, when it was traced apart (its optimizer makes its state)."""
    inference_peak_bytes: int | None = None
    saved_activations_bytes: int | None = None
    peak_phase: str | None = None
    """forward, backward or optimizer: when the training peak happened."""
    peak_tick: int | None = None
    """The op tick of the training peak. One depth runs the same ops at every batch size, so a
    change along a row is a change of the peak's moment (NOTE [ Affine in batch ])."""
    predicted_training_peak_bytes: int | None = None
    """Real sweeps only: the fake trace's training peak, checked before the cell runs."""
    closed_form_training_peak_bytes: int | None = None
    """The seed MLP's closed form for the same cell, where it has one."""
    message: str | None = None
    """Why a cell is ``oom`` or ``error``, in one line."""
    trace_s: float = 0.0
    """Seconds this cell took, building and tracing included."""

    @property
    def ratio(self) -> float | None:
        """Training peak over inference peak."""
        if self.training_peak_bytes is None or not self.inference_peak_bytes:
            return None
        return self.training_peak_bytes / self.inference_peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "depth": self.depth,
            "status": self.status,
            "training_peak_bytes": self.training_peak_bytes,
            "first_step_peak_bytes": self.first_step_peak_bytes,
            "inference_peak_bytes": self.inference_peak_bytes,
            "saved_activations_bytes": self.saved_activations_bytes,
            "peak_phase": self.peak_phase,
            "peak_tick": self.peak_tick,
            "training_to_inference": self.ratio,
            "predicted_training_peak_bytes": self.predicted_training_peak_bytes,
            "closed_form_training_peak_bytes": self.closed_form_training_peak_bytes,
            "message": self.message,
            "trace_s": self.trace_s,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class LineFit:
    """``bytes = fixed + per_example × batch``, by least squares in exact arithmetic.

    The coefficients are fitted, not counted, hence floats; they are whole numbers of bytes
    when the points are exactly affine (NOTE [ Affine in batch ]).
    """

    fixed_bytes: float
    per_example_bytes: float
    max_residual_bytes: float
    """The largest |measured - fitted| over the points: 0 when the points are exactly affine."""
    points: int

    def predict(self, batch_size: int) -> float:
        return self.fixed_bytes + self.per_example_bytes * batch_size

    def to_dict(self) -> dict[str, Any]:
        return {"fixed_bytes": self.fixed_bytes, "per_example_bytes": self.per_example_bytes,
                "max_residual_bytes": self.max_residual_bytes, "points": self.points}


def fit_line(batch_sizes: Sequence[int], values: Sequence[int]) -> LineFit | None:
    """The least-squares line through ``(batch, bytes)``; None with fewer than two distinct
    batch sizes. Exact (``Fraction``): float64 would leave residuals of a few bytes at TiB."""
    if len(batch_sizes) != len(values) or len(set(batch_sizes)) < 2:
        return None
    n = len(batch_sizes)
    sx, sy = sum(batch_sizes), sum(values)
    sxx = sum(x * x for x in batch_sizes)
    sxy = sum(x * y for x, y in zip(batch_sizes, values, strict=True))
    slope = Fraction(n * sxy - sx * sy, n * sxx - sx * sx)
    intercept = (sy - slope * sx) / n
    residual = max(abs(y - intercept - slope * x) for x, y in zip(batch_sizes, values,
                                                                    strict=True))
    return LineFit(fixed_bytes=float(intercept), per_example_bytes=float(slope),
                   max_residual_bytes=float(residual), points=n)


@dataclass(frozen=True, kw_only=True, slots=True)
class DepthFit:
    """The lines of one depth."""

    depth: int | None
    training: LineFit | None
    inference: LineFit | None
    closed_form_training: LineFit | None
    """The same line through the closed form's training peaks (seed MLP only)."""

    def to_dict(self) -> dict[str, Any]:
        def plain(line: LineFit | None) -> dict[str, Any] | None:
            return None if line is None else line.to_dict()

        return {"depth": self.depth, "training_peak": plain(self.training),
                "inference_peak": plain(self.inference),
                "closed_form_training_peak": plain(self.closed_form_training)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Sweep:
    """A grid of cells, depth by batch size."""

    workload: dict[str, Any]
    """What was swept: name, dtype, device, mode (``fake`` or ``real``), the seed's widths."""
    batch_sizes: tuple[int, ...]
    depths: tuple[int | None, ...]
    cells: tuple[SweepCell, ...]
    """Depth-major: every batch size of the first depth, then the next depth."""
    wall_s: float

    @property
    def mode(self) -> str:
        return str(self.workload.get("mode", "fake"))

    def cell(self, batch_size: int, depth: int | None) -> SweepCell:
        for cell in self.cells:
            if cell.batch_size == batch_size and cell.depth == depth:
                return cell
        raise KeyError((batch_size, depth))

    def line_fits(self) -> tuple[DepthFit, ...]:
        """Per depth, the lines through its ``ok`` cells."""
        fits = []
        for depth in self.depths:
            cells = [c for c in self.cells if c.depth == depth and c.status == "ok"]
            xs = [c.batch_size for c in cells]
            closed = [c.closed_form_training_peak_bytes for c in cells]
            fits.append(DepthFit(
                depth=depth,
                training=fit_line(xs, [c.training_peak_bytes or 0 for c in cells]),
                inference=fit_line(xs, [c.inference_peak_bytes or 0 for c in cells]),
                closed_form_training=None if None in closed else fit_line(
                    xs, [c or 0 for c in closed]),
            ))
        return tuple(fits)

    def to_dict(self) -> dict[str, Any]:
        """DESIGN's sweep document (``schema_version: 1``)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "workload": dict(self.workload),
            "batch_sizes": list(self.batch_sizes),
            "depths": list(self.depths),
            "cells": [c.to_dict() for c in self.cells],
            "fits": [f.to_dict() for f in self.line_fits()],
            "wall_s": self.wall_s,
        }


def sweep(
    build: Build,
    *,
    batch_sizes: Sequence[int],
    depths: Sequence[int | None] = (None,),
    real: bool = False,
    available_bytes: int | None = None,
    on_cell: Callable[[SweepCell], None] | None = None,
) -> Sweep:
    """Trace every (depth, batch size) cell; fake unless ``real``.

    ``available_bytes`` caps what a real cell may be predicted to need (default: the device's
    available memory, read before each cell). ``on_cell`` is called after each cell (a progress
    bar). A ``UsageError`` (the same for every cell) ends the sweep; any other failure of a cell
    is recorded on the cell and the sweep goes on.
    """
    if not batch_sizes or not depths:
        raise UsageError("a sweep needs at least one batch size and one depth: give batch "
                         "sizes such as 1,64,4096 (and depths such as 1,8,64 where they apply)")
    for value in (*batch_sizes, *(d for d in depths if d is not None)):
        if value < 1:
            raise UsageError(f"sweep size {value} is below 1: batch sizes and depths are "
                             "positive integers")
    start = time.perf_counter()
    cells: list[SweepCell] = []
    described: dict[str, Any] = {}
    for depth in depths:
        for batch_size in batch_sizes:
            cell, workload = _cell(build, batch_size, depth, real, available_bytes)
            if workload and not described:
                described = workload
            cells.append(cell)
            if on_cell is not None:
                on_cell(cell)
    described = {k: v for k, v in described.items() if k not in ("batch_size", "depth")}
    described["mode"] = "real" if real else "fake"
    return Sweep(workload=described, batch_sizes=tuple(batch_sizes), depths=tuple(depths),
                 cells=tuple(cells), wall_s=time.perf_counter() - start)


def _cell(
    build: Build, batch_size: int, depth: int | None, real: bool, available_bytes: int | None
) -> tuple[SweepCell, dict[str, Any]]:
    start = time.perf_counter()
    size: dict[str, Any] = {"batch_size": batch_size, "depth": depth}
    # NOTE [ A cell's errors ]: the user's code raises a MemPropError (user_code names its
    # frame), recorded on the cell; a UsageError is the same for every cell and ends the sweep;
    # anything else is memprop's bug and keeps its traceback.
    try:
        fake = trace_fake(build, batch_size, depth)
    except UsageError:
        raise
    except MemPropError as error:
        if not (real and (is_fake_tensor_limit(error) or is_fake_kernel_refusal(error))):
            return SweepCell(**size, status="error", message=_one_line(error, "fake trace"),
                             trace_s=time.perf_counter() - start), {}
        # Code fake tensors cannot trace (it reads values; a fake kernel stricter than the
        # real one) runs for real unchecked, as profile's pre-check lets it.
        return _real_cell(build, size, None, None, start)
    closed = (fake.closed_form or {}).get("training_peak_bytes")
    if not real:
        return SweepCell(
            **size, status="ok", training_peak_bytes=fake.training_peak_bytes,
            first_step_peak_bytes=fake.first_step_peak_bytes,
            inference_peak_bytes=fake.inference_peak_bytes,
            saved_activations_bytes=fake.saved_activations_bytes, peak_phase=fake.peak_phase,
            peak_tick=fake.timeline.peak_tick,
            closed_form_training_peak_bytes=closed, trace_s=time.perf_counter() - start,
        ), fake.workload
    predicted = fake.required_bytes
    device = str(fake.workload["device"])
    del fake
    reason = shortfall(predicted, device, available_bytes=available_bytes)
    if reason is not None:
        return SweepCell(
            **size, status="oom", predicted_training_peak_bytes=predicted,
            closed_form_training_peak_bytes=closed, trace_s=time.perf_counter() - start,
            message=f"not run: the step {reason}",
        ), {}
    return _real_cell(build, size, predicted, closed, start)


def _real_cell(build: Build, size: dict[str, Any], predicted: int | None, closed: int | None,
               start: float) -> tuple[SweepCell, dict[str, Any]]:
    """The cell run for real (``predicted``: the fake trace's peak, None when fake tensors
    could not trace it)."""
    batch_size, depth = size["batch_size"], size["depth"]
    device = ""
    try:
        with user_code(f"building batch {batch_size}"):
            workload = build(batch_size, depth)
        device = str(device_of(workload))
        result = profile(workload)
    except UsageError:
        raise
    except Exception as error:
        if not isinstance(error, MemPropError) and not is_out_of_memory(error):
            raise  # NOTE [ A cell's errors ]
        status = "oom" if is_out_of_memory(error) else "error"
        message = _one_line(error, "ran out of memory" if status == "oom" else "real run")
        return SweepCell(**size, status=status, predicted_training_peak_bytes=predicted,
                         closed_form_training_peak_bytes=closed, message=message,
                         trace_s=time.perf_counter() - start), {}
    finally:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return SweepCell(
        **size, status="ok", training_peak_bytes=result.training_peak_bytes,
        first_step_peak_bytes=result.first_step_peak_bytes,
        inference_peak_bytes=result.inference_peak_bytes,
        saved_activations_bytes=result.saved_activations_bytes, peak_phase=result.peak_phase,
        peak_tick=result.timeline.peak_tick,
        predicted_training_peak_bytes=predicted, closed_form_training_peak_bytes=closed,
        trace_s=time.perf_counter() - start,
    ), result.workload


def _one_line(error: BaseException, where: str) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, MemPropError):
        return f"{where}: {text}"
    return f"{where}: {type(error).__name__}: {text}" if text else \
        f"{where}: {type(error).__name__}"
