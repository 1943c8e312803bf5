"""The contract every way of running the step across ranks keeps (accumulation, DDP, FSDP2,
ZeRO-1, pipelines), and what its candidates are made of.

NOTE [ One contract for a strategy ]
A strategy is one module under ``memprop.distribute.strategies`` holding one instance of a
:class:`Strategy`, listed once in that package's registry. It answers three questions, and
nothing else in memprop asks them by its name:

- **predict per rank** (:meth:`Strategy.candidates`): for the microbatch counts asked, the
  candidates it offers, each with every rank's predicted peak (the ledger's, on fake tensors)
  and its step's time (``memprop.distribute.steptime``'s calibrated roofline, and
  ``memprop.distribute.communication``'s price of its collectives), both through the
  :class:`Request` the candidates share;
- **build on a rank** (:meth:`Strategy.build_rank`): inside a launched rank, the candidate's
  model and optimizer wrapped as it runs them, its step through
  ``memprop.loop.accumulated_step``, and what the rank holds before it (:class:`BuiltRank`);
- **run and measure** (:meth:`Strategy.run_rank`): ``steps`` steps, the last counted by the
  ledger and by the allocator (``memprop.distribute.launch.measured``), the same for every
  strategy;
- how a candidate reads (:meth:`Strategy.describe`, :meth:`Strategy.family`).

``memprop.distribute.distribute``, the launch, the CLI, the report and the bench iterate the
registry; a new strategy is a new module there and one line in the registry.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from memprop.distribute import steptime
from memprop.trace.fake import new_fake_mode
from memprop.trace.ledger import rounded_bytes
from memprop.workload import Workload

if TYPE_CHECKING:
    from memprop.distribute.pipeline import PipelineShape
    from memprop.plan.chain import Chain
    from memprop.plan.solvers import Plan

__all__ = ["BuiltRank", "Candidate", "Factory", "Rank", "Request", "Strategy", "bucket_bytes",
           "bucket_copies_s", "copy_rate"]

Factory = Callable[[int], Workload]
"""Builds a rank's workload for a batch size (each rank builds its own)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Rank:
    rank: int
    predicted_peak_bytes: int
    measured_peak_bytes: int | None = None
    """The ledger's count of the rank's steady-state step, with ``run=True``."""
    allocator_peak_bytes: int | None = None
    """The allocator's count of the same step (``memprop.devices.allocator``): the independent
    figure predictions are checked against."""

    @property
    def independent_peak_bytes(self) -> int | None:
        """What a prediction is checked against: the allocator's figure where there is one,
        else the ledger's."""
        return (self.allocator_peak_bytes if self.allocator_peak_bytes is not None
                else self.measured_peak_bytes)


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """One way to run the step, predicted per rank."""

    strategy: str
    """The registered strategy's name: ``accumulate`` (one device), ``ddp``, ``fsdp``
    (FSDP2), ``zero1`` or ``pipeline``."""
    devices: int
    microbatches: int
    microbatch_size: int
    """Samples per microbatch on each rank."""
    fits: bool
    """Every rank's predicted peak is within the budget."""
    predicted_step_s: float
    """Compute of the step at the calibrated roofline's rates (recomputation included), plus
    the strategy's collectives."""
    ranks: tuple[Rank, ...]
    least_budget_bytes: int
    """The least per-rank budget this candidate meets, recomputing as much as it can."""
    plan: Plan | None = None
    """memprop's recomputation plan for each rank's microbatch step, when it needs one."""
    layout: PipelineShape | tuple[str, ...] | None = None
    """What the strategy needs besides to build a rank: a pipeline's schedule and split
    points, FSDP2's units (the blocks' qualified names)."""
    measured_step_s: float | None = None
    why: str = ""
    """Why it was not chosen (empty for the chosen one)."""

    @property
    def peak_bytes(self) -> int:
        return max(r.predicted_peak_bytes for r in self.ranks)

    @property
    def pipeline(self) -> PipelineShape | None:
        """The schedule and split points of a pipeline candidate."""
        return None if self.layout is None or isinstance(self.layout, tuple) else self.layout

    @property
    def sharded(self) -> tuple[str, ...]:
        """FSDP2's units besides the root: the blocks' qualified names."""
        return self.layout if isinstance(self.layout, tuple) else ()

    def describe(self) -> str:
        """``DDP 2 ranks, 4x256 +8% recompute``: where, microbatches x their size, and what
        the strategy adds (its own words)."""
        from memprop.distribute.strategies import strategy_of

        return strategy_of(self).describe(self)

    def to_dict(self) -> dict[str, Any]:
        pipeline = self.pipeline
        return {
            "strategy": self.strategy,
            "schedule": None if pipeline is None else pipeline.schedule,
            "microbatches": self.microbatches,
            "microbatch_size": self.microbatch_size,
            "split": None if pipeline is None else list(pipeline.bounds),
            "recomputed_stages": None if pipeline is None else list(pipeline.recomputed),
            "devices": self.devices,
            "fits": self.fits,
            "predicted_step_s": self.predicted_step_s,
            "measured_step_s": self.measured_step_s,
            "least_budget_bytes": self.least_budget_bytes,
            "recompute_overhead": None if self.plan is None else self.plan.compute_overhead,
            "why_not": self.why or None,
            "ranks": [{"rank": r.rank, "predicted_peak_bytes": r.predicted_peak_bytes,
                       "measured_peak_bytes": r.measured_peak_bytes,
                       "allocator_peak_bytes": r.allocator_peak_bytes} for r in self.ranks],
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class BuiltRank:
    """A candidate built on a launched rank (``Strategy.build_rank``)."""

    step: Callable[[], None]
    """One training step of the rank, through ``memprop.loop.accumulated_step``."""
    loop: Workload
    """The rank's loop: its optimizer and ``set_to_none`` zero the gradients between steps."""
    ledger: Callable[[], Any]
    """A ``StorageLedger`` holding what the rank holds before its step."""
    held: Callable[[], list[torch.Tensor]]
    """What the rank holds outside its step, now (the allocator's count leaves it out)."""
    device: torch.device


class Strategy(abc.ABC):
    """A way to run the step across ranks (NOTE [ One contract for a strategy ])."""

    name: str
    """The word ``--strategy`` and the JSON's ``strategy`` use."""
    label: str
    """How reports name it (``DDP``, ``FSDP2``)."""
    single_device: bool = False
    """Its candidates run on one device (their steps are timed at one device's threads)."""
    predicted_as: str
    """How its ranks are predicted, in a few words for the report."""

    @abc.abstractmethod
    def candidates(self, request: Request, counts: Sequence[int], *, alone: bool
                   ) -> tuple[list[Candidate], list[str]]:
        """Predict per rank: a candidate for each of the microbatch ``counts`` it can run,
        and notes saying why it has none, or none of some kind. ``alone``: it is the only
        strategy asked for, so a reason it has no candidate at all is the user's error
        (:class:`memprop.errors.UsageError`), not a note."""

    def microbatch_sizes(self, request: Request, counts: Sequence[int]) -> set[int]:
        """The microbatch sizes its candidates will use (the step-time model times them): the
        batch split over its ranks (one, or every device) in each count of microbatches."""
        if not self.single_device and request.devices < 2:
            return set()
        ranks = 1 if self.single_device else request.devices
        return {size for m in counts if (size := request.split(m, ranks)) is not None}

    @abc.abstractmethod
    def build_rank(self, factory: Factory, candidate: Candidate, rank: int
                   ) -> AbstractContextManager[BuiltRank]:
        """Inside a launched rank (``rank`` below ``candidate.devices``): the rank's workload
        built from the factory, its model and optimizer wrapped as the candidate runs them;
        its step ready to run while the context is open."""

    def run_rank(self, factory: Factory, candidate: Candidate, steps: int, rank: int
                 ) -> dict[str, Any]:
        """Build the candidate on this rank, run ``steps`` steps and measure the last
        (``memprop.distribute.launch.measured``)."""
        from memprop.distribute.launch import measured

        with self.build_rank(factory, candidate, rank) as built:
            return measured(built, steps)

    def describe(self, candidate: Candidate) -> str:
        """``DDP 2 ranks, 4x256 +8% recompute``: where, microbatches x their size, and the
        recomputation plan's extra compute."""
        where = "1 device" if candidate.devices == 1 else f"{self.label} {candidate.devices} ranks"
        said = f"{where}, {candidate.microbatches}x{candidate.microbatch_size}"
        if candidate.plan is not None:
            said += f" +{candidate.plan.compute_overhead:.0%} recompute"
        return said

    def family(self, candidate: Candidate) -> str:
        """The kind of answer the candidate stands for (the bench's families)."""
        return self.label


@dataclass(slots=True)
class Request:
    """What every candidate is built from, and the microbatch chains they share (traced once
    per microbatch size and gradient zeroing, whichever strategy asks)."""

    factory: Factory
    batch_size: int
    devices: int
    budget_bytes: int | None
    comm: Any
    backend: str
    calibration: steptime.Calibration = steptime.UNCALIBRATED
    sharded: steptime.ShardedCosts | None = None
    """FSDP2's own costs, timed once (``steptime.sharded_costs``) when calibrated."""
    _chains: dict[tuple[int, bool], tuple[Workload, Chain]] = field(default_factory=dict)

    def calibrate(self, sizes: list[int], world: int) -> None:
        """Time the workload once (NOTE [ Calibrating the roofline on the workload ])."""
        from memprop.distribute.launch import available_cores

        cores = available_cores()
        self.calibration = steptime.calibrate(
            self.factory, sizes, lambda m: self.unplanned(m).compute,
            lambda m: self.unplanned(m).peak_bytes, max(1, cores // min(world, cores)))

    def unplanned(self, micro: int) -> Any:
        """The unplanned microbatch step, simulated."""
        from memprop.plan.schedule import flat, simulate

        return simulate(self.chain(micro)[1], flat(len(self.chain(micro)[1])))

    def blocks(self, micro: int) -> tuple[str, ...]:
        """The blocks of the microbatch's chain (its stages but the pinned prefix and suffix):
        FSDP2's units."""
        return tuple(s.name for s in self.chain(micro)[1].stages if not s.pinned)

    def time_sharded(self, micro: int) -> None:
        """FSDP2's own costs on a microbatch of ``micro``, timed when the workload was
        calibrated and the microbatch is small enough to run here."""
        from memprop.distribute.launch import available_cores

        unplanned = self.unplanned(micro)
        if (not self.calibration.sizes or unplanned.compute > steptime.CALIBRATION_S
                or unplanned.peak_bytes > steptime.CALIBRATION_BYTES):
            return
        cores = available_cores()
        self.sharded = steptime.sharded_costs(
            self.factory, micro, self.blocks(micro), self.devices,
            max(1, cores // min(self.devices, cores)), self.factor(micro) * unplanned.compute)

    def factor(self, micro: int) -> float:
        """What the roofline's prices of a microbatch of ``micro`` are multiplied by."""
        return self.calibration.factor(self.unplanned(micro).compute)

    def pipeline_action_s(self, schedule: str = "GPipe") -> float:
        """What the pipeline runtime adds to each action of a stage under ``schedule`` (timed
        once a machine), when the steps are calibrated."""
        if not self.calibration.sizes:
            return 0.0
        from memprop.distribute.communication import pipeline_action_s

        return pipeline_action_s(self.backend, schedule)

    def microbatches_s(self, micro: int, microbatches: int, compute: float) -> float:
        """``microbatches`` microbatches of ``micro`` samples, each priced ``compute`` by the
        roofline (with gradients accumulating from the second on, and a plan's recomputation),
        and the optimizer's step. Calibrated, the accumulating adds are priced as the bytes
        they move (each gradient read twice and written once), at the calibrated copy rate,
        not by the roofline's pointwise timings of in-place adds (which a loaded machine can
        leave far off)."""
        if microbatches > 1 and self.calibration.sizes:
            from memprop.plan.schedule import flat, simulate

            workload, chain = self.chain(micro, set_to_none=False)
            accumulating = simulate(chain, flat(len(chain))).compute
            compute -= max(0.0, accumulating - self.unplanned(micro).compute)
            adds = self.calibration.scale * 3 * bucket_bytes(workload) / copy_rate()
            return (microbatches * self.factor(micro) * compute + self.optimizer_s()
                    + (microbatches - 1) * adds)
        return microbatches * self.factor(micro) * compute + self.optimizer_s()

    def optimizer_s(self, share: float = 1.0) -> float:
        """The optimizer's step over ``share`` of the parameters."""
        return self.calibration.optimizer_s * share

    def fits(self, peak: int) -> bool:
        return self.budget_bytes is None or peak <= self.budget_bytes

    def split(self, microbatches: int, devices: int | None = None) -> int | None:
        """Samples per microbatch when the batch splits into ``microbatches`` on each of
        ``devices`` ranks (default: all), else None."""
        ranks = self.devices if devices is None else devices
        if self.batch_size % (ranks * microbatches):
            return None
        return self.batch_size // (ranks * microbatches)

    def chain(self, micro: int, *, set_to_none: bool = True,
              optimizer: Callable[[Workload], Any] | None = None) -> tuple[Workload, Chain]:
        """A fake workload of ``micro`` samples and the chain of its steady-state step. The
        gradients are zeroed as the workload's loop does, held (``set_to_none=False``) where
        the caller says they accumulate; ``optimizer(workload)`` replaces the workload's
        optimizer (a rank's own: not cached)."""
        from memprop.plan.api import chain_of

        key = (micro, set_to_none)
        if key in self._chains and optimizer is None:
            return self._chains[key]
        with new_fake_mode():
            workload = self.factory(micro)
        workload.set_to_none = workload.set_to_none and set_to_none
        if optimizer is not None:
            workload.optimizer = optimizer(workload)
        made = (workload, chain_of(workload, cost_model="roofline", fake=True))
        if optimizer is None:
            self._chains[key] = made
        return made


def bucket_bytes(workload: Workload) -> int:
    """DDP's gradient buckets: a copy of every gradient (``gradient_as_bucket_view=False``)."""
    return sum(rounded_bytes(p.numel() * p.element_size(), p.device)
               for p in workload.model.parameters() if p.requires_grad)


def bucket_copies_s(nbytes: int) -> float:
    """DDP copies every gradient into its bucket and the reduced bucket back: two copies,
    each reading and writing ``nbytes``, at this machine's copy rate."""
    return 4 * nbytes / copy_rate()


def copy_rate() -> float:
    from memprop.calibration.rates import machine_rates

    return machine_rates("cpu").bytes_per_s
