"""The chain the planner sees, and its memory model.

A chain is stages ``0..n-1`` run in order, as the children of an ``nn.Sequential``. Write ``x_j``
for the activation between stage ``j-1`` and stage ``j`` (``x_0`` is the model's input, already in
``fixed_bytes``, so it weighs 0 here; ``x_{j+1}`` weighs ``stages[j].output_bytes``) and ``d_j``
for its gradient, the same size. Stage ``i``'s input is taken to be stage ``i-1``'s output (one
storage), so ``input_bytes`` is informational. A stage whose output *aliases* its input (an
in-place op such as ``ReLU(inplace=True)``, a view such as ``Flatten``) hands on the same storage:
``x_{i+1}`` and ``x_i`` are then one storage, counted once (:meth:`Chain.storage_of`).

# NOTE [ The memory model ]
The live bytes at any moment are ``fixed_bytes`` plus the sum of these storages, each counted once
however many holders share it (the simulator keeps a reference count per activation storage):

- ``x_j`` is live while anyone holds it: the stage producing it, until the next one has run
  (the "flow"); stage ``j`` when it is run normally and ``saves_input``; stage ``j-1`` when it is
  run normally and ``saves_output``; a checkpointed segment that starts at ``j`` (its stored
  input) until its backward is over; and, for ``x_n``, the caller, who holds the model's output
  until the step ends.
- A stage run normally keeps its private tape, ``saved_bytes`` less its output when
  ``saves_output`` (the output is counted as ``x_{i+1}`` above), from its forward to its backward.
  A stage run inside a checkpoint keeps nothing: ``torch.utils.checkpoint(use_reentrant=False)``
  drops the saved tensors and keeps only the segment's input.
- What a stage's first forward leaves alive without saving it (``forward_held_bytes``: the
  model's own locals) is live from then until the forward returns, in every plan.
- The loss: at the end of the forward the moment is the live total plus ``loss_peak_bytes``
  (the loss's forward and backward); then ``loss_residual_bytes`` (``d_n``, the loss itself, and
  whatever else the loss left) stays live through the whole backward, less ``d_n`` once the last
  stage has consumed it.
- Gradients: stage ``i``'s backward holds ``d_{i+1}``, produces ``d_i`` (none for stage 0: the
  model's input needs no gradient) and then frees ``d_{i+1}`` (but for ``d_n`` when the chain's
  output is the loss itself: ``d_n`` is then the backward's seed, which
  ``torch.autograd.backward`` holds to the end, ``output_grad_held``), its tape and its holds; the
  parameter gradients it produced, ``gradient_bytes``, stay live until the step ends. When
  backward reaches a checkpointed segment ``[a, s)``, ``d_s`` and the parameter gradients of every
  stage from ``s`` on are live while the segment is re-run (by its own inner plan, which may hold
  further checkpoints) and then differentiated.
- Selective options: a checkpoint of one stage at the top level may keep some of the stage's
  op outputs (``Stage.options``): they are live from its first run to the end of its re-run's
  forward (where they become part of the re-run's tape), and the re-run costs less by what they
  save.
- Random state: a checkpointed segment ``[a, s)`` whose stages draw random numbers
  (``Stage.draws_random``: dropout) keeps the generators' state for its re-run
  (``torch.utils.checkpoint``'s ``preserve_rng_state``: ``rng_state_bytes``, 5,056 bytes on
  the CPU), never shared, from its first forward until its backward is over; when backward
  reaches it, its re-run saves the state it will put back (``torch.random.fork_rng``), one more
  ``rng_state_bytes`` through the re-run's forward. A segment that draws nothing keeps no state
  (``memprop.run.install``).
- Transients: the moment of a stage's forward is the live total when it began plus
  ``max(forward_peak_bytes, output + tape)`` (no output term when it aliases its input); of its
  backward, the live total when it began (which holds ``d_{i+1}``) plus
  ``max(backward_peak_bytes, d_i)`` (``backward_peak_bytes`` alone for an aliasing stage, whose
  input gradient may be a view). The clamps keep the model coherent for stats that under-report
  (the moment after an op never exceeds the moment during it); traced stats never need them.
- The optimizer: its moment, ``optimizer_peak_bytes``, is an absolute live total that no plan
  changes (every activation is gone by then, and what is left is the same in every plan).

The peak of a schedule is the larger of the optimizer's moment and ``fixed_bytes`` plus the
largest of the moments above. The model is written once, as the fold of a schedule's actions
(:mod:`memprop.plan.actions`) by :class:`memprop.plan.memory.Ledger`: the simulator
(:func:`memprop.plan.schedule.simulate`) folds a plan's whole schedule, the dynamic programs
(:mod:`memprop.plan._dp`) fold each unit's own and add the results up; the tests hold them equal
(exhaustive search), and hold the unplanned schedule's peak equal to the ledger's traced peak on
real models.

# NOTE [ The head option ]
A causal language model's suffix (its last norm, its ``lm_head`` and the loss over a large
vocabulary) may hold the step's peak: the logits, their log-softmax and their gradient. The
head option computes the head and the loss in chunks of tokens, each chunk recomputed in the
backward (``memprop.trace.head``): the same step with another suffix and another loss. Its
chains (``Chain.heads``, one per chunk count: ``memprop.trace.head.chunk_counts``) are traced
so, not derived: their suffix's tape, moments and compute (one more forward of the head in its
backward) and their loss's moments are what the chunked step did. More chunks hold less of the
logits at once; each chunk reads the head's weight once more in the forward, twice more in the
backward, and adds its share into the weight's whole gradient. The planner solves every chain
and takes the one of least compute under the budget (``memprop.plan.solvers.solve``); the
unplanned step is always the model's own, so a plan with the head option reports the option's
price in its extra compute.

What the roofline sees there (NOTE [ Storages the CPU maps fresh ] in
``memprop.trace.stages``): on a CPU the model's own head makes its full logits, their
log-softmax and their gradients as storages of hundreds of MiB, each mapped fresh by the
allocator at every step, where one chunk's are reused from malloc's free lists; priced by their
bytes alone, the model's own head looked cheap and the option dear (on HF GPT-2, width 256,
vocabulary 50,257, 1,024 tokens: the option priced at +400 ms of the step where it measured
+256-321 ms). ``x[rows, labels]`` read or written in place moves the elements it selects,
not the whole tensor (``memprop.trace.ledger``).

Known limitations: stages with several inputs or outputs are outside the model (the prefix's
other outputs, such as attention masks, count as its tape, and storages a stage leaves alive at
the end of the step as held from the start); an aliasing stage
is never the first stage of a checkpointed segment (:meth:`Chain.atoms` glues it to the stage
before, so an in-place op never writes into a checkpoint's stored input); a loss whose output
gradient is smaller than the output (``output.sum()``: an expanded scalar) is charged the full
``d_n``, which over-predicts by at most ``d_n``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from memprop.calibration.rates import Probe, Rates
from memprop.errors import UsageError
from memprop.plan.costs import check_cost_model
from memprop.plan.selective import Option, options
from memprop.trace.stages import BlockOp, ChainCosts, StageStats

if TYPE_CHECKING:
    from memprop.plan.schedule import Segment

__all__ = ["Chain", "CostModel", "Stage", "rng_state_bytes_on"]

CostModel = Literal["roofline", "flops", "measured"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Stage:
    """One link of the chain, in the units the planner prices it."""

    name: str
    """The stage's qualified module name (``layers.3``)."""
    forward_cost: float
    """Cost of one forward run (seconds, or FLOPs under ``Chain.cost_model`` ``flops``)."""
    backward_cost: float
    """Cost of the backward."""
    input_bytes: int
    """The stage's input activation (informational: the model uses the previous output)."""
    output_bytes: int
    """The stage's output activation; its gradient has the same size."""
    saved_bytes: int
    """What the stage saves for backward, its input excluded, its output included when
    ``saves_output``."""
    saves_input: bool
    """Whether the backward needs the stage's input (kept alive while the tape is)."""
    saves_output: bool
    """Whether the output's storage is among ``saved_bytes``."""
    forward_peak_bytes: int
    """Transient of the forward above the live total when it began."""
    backward_peak_bytes: int
    """Transient of the backward above the live total when it began."""
    gradient_bytes: int = 0
    """Parameter gradients born in the stage's backward that stay live until the step ends."""
    aliases_input: bool = False
    """Whether the output is the input's storage (an in-place op, a view)."""
    pinned: bool = False
    """Always kept with its whole tape, never part of a checkpointed segment: the prefix and the
    suffix around a model's blocks, which the runtime does not wrap."""
    forward_held_bytes: int = 0
    """What the stage's first forward leaves alive, unsaved, until the forward returns (the
    model's own locals): the same in every plan."""
    options: tuple[Option, ...] = ()
    """Selective recomputations of the stage when it is checkpointed alone at the top level
    (``memprop.plan.selective``): op outputs kept until its re-run, which then costs less."""
    draws_random: bool = True
    """Whether the forward draws random numbers (dropout): only a checkpoint around such a
    stage keeps the generators' state to re-run it the same (``memprop.run.install``)."""

    @property
    def tape_bytes(self) -> int:
        """The saved bytes that are neither the input nor the output."""
        return max(0, self.saved_bytes - (self.output_bytes if self.saves_output else 0))


@dataclass(frozen=True, kw_only=True, slots=True)
class Chain:
    """The planner's problem: stages, the bytes outside them and the unit of cost."""

    stages: tuple[Stage, ...]
    """The stages, in execution order."""
    fixed_bytes: int = 0
    """Bytes live at every moment: parameters, buffers, inputs, gradients and optimizer state
    that existed before the step."""
    cost_model: str = "measured"
    """How ``forward_cost`` and ``backward_cost`` were priced (``memprop.plan.costs``): in
    counted FLOPs for ``flops``, in seconds otherwise."""
    cost_note: str = ""
    """How the costs were priced, for the report (the roofline's rates)."""
    loss_peak_bytes: int | None = None
    """The loss's moment over the live total at the end of the forward; ``None``: ``d_n`` alone
    (a loss that makes nothing but the output's gradient)."""
    loss_residual_bytes: int | None = None
    """What the loss leaves live through the backward, ``d_n`` included; ``None``: ``d_n``."""
    optimizer_peak_bytes: int = 0
    """The optimizer step's live total, absolute (``fixed_bytes`` included); 0 without one."""
    output_grad_held: bool = False
    """Whether ``d_n`` outlives the last stage's backward (the chain's output is the loss, and
    ``d_n`` the seed that ``torch.autograd.backward`` holds to the end of the backward)."""
    output_grad_bytes: int | None = None
    """The size of ``d_n`` as the last stage's backward received it; ``None``: the size of
    ``x_n``. They differ when the model's output holds more than what the loss is taken of (a
    Hugging Face output: the loss the forward computed, beside the logits)."""
    rng_state_bytes: int = 0
    """What a checkpoint around stages that draw random numbers keeps of the generators' state
    on the chain's device (NOTE [ The memory model ]): ``torch.get_rng_state()``, 5,056 bytes,
    when the step runs on the CPU; 0 on a GPU, whose generators' states checkpoint keeps in
    host memory."""
    head_chunks: int = 0
    """In how many chunks of tokens this chain's step computes its head and loss
    (``memprop.trace.head``): 0 for the model's own head."""
    heads: tuple[Chain, ...] = ()
    """The same step with the head and the loss in chunks (its suffix and loss traced so), one
    chain per chunk count, fewest chunks first, when the option applies: the planner's
    alternatives to this chain (NOTE [ The head option ])."""
    _roots: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _draws_before: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _grads_from: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.stages:
            raise UsageError("a chain needs at least one stage: the model has no children to plan")
        for i, stage in enumerate(self.stages):
            sizes = (stage.output_bytes, stage.saved_bytes, stage.forward_peak_bytes,
                     stage.backward_peak_bytes, stage.input_bytes, stage.gradient_bytes)
            if min(sizes) < 0 or stage.forward_cost < 0 or stage.backward_cost < 0:
                raise UsageError(f"stage {stage.name!r} has a negative size or cost: {stage}")
            before = self.stages[i - 1].output_bytes if i > 0 else stage.output_bytes
            if stage.aliases_input and stage.output_bytes != before:
                raise UsageError(
                    f"stage {stage.name!r} aliases its input but its output has "
                    f"{stage.output_bytes} bytes against its input's "
                    f"{before}: give equal sizes or aliases_input=False"
                )
        outside = (self.fixed_bytes, self.optimizer_peak_bytes,
                   self.loss_peak_bytes or 0, self.loss_residual_bytes or 0,
                   self.rng_state_bytes)
        if min(outside) < 0:
            raise UsageError(f"the chain's bytes outside the stages are negative: {outside}; "
                             "give numbers of bytes >= 0")
        roots = [0]
        for i, stage in enumerate(self.stages):
            roots.append(roots[i] if stage.aliases_input else i + 1)
        grads = [0] * (len(self.stages) + 1)
        for i in reversed(range(len(self.stages))):
            grads[i] = grads[i + 1] + self.stages[i].gradient_bytes
        object.__setattr__(self, "_roots", tuple(roots))
        object.__setattr__(self, "_grads_from", tuple(grads))
        draws = [0]
        for stage in self.stages:
            draws.append(draws[-1] + stage.draws_random)
        object.__setattr__(self, "_draws_before", tuple(draws))

    def __len__(self) -> int:
        return len(self.stages)

    def stash_bytes(self, start: int, stop: int) -> int:
        """What a checkpoint of stages ``start..stop-1`` keeps of the generators' state: one
        ``rng_state_bytes`` when a stage draws random numbers, else nothing."""
        draws = self._draws_before[stop] > self._draws_before[start]
        return self.rng_state_bytes if draws else 0

    def act_bytes(self, j: int) -> int:
        """Size of ``x_j`` (and of ``d_j``); ``x_0`` lives in ``fixed_bytes`` and weighs 0."""
        return 0 if j == 0 else self.stages[j - 1].output_bytes

    def storage_of(self, j: int) -> int:
        """The activation whose storage ``x_j`` is: ``j`` itself unless stages before it alias
        their inputs. Holders of ``x_j`` count against that storage."""
        return self._roots[j]

    def storage_bytes(self, root: int) -> int:
        """Size of the storage that :meth:`storage_of` names (0 for the model's input)."""
        return 0 if root == 0 else self.act_bytes(root)

    def gradients_from(self, i: int) -> int:
        """Parameter gradients born in the backward of stages ``i..n-1``."""
        return self._grads_from[i]

    def forward_moment_bytes(self, i: int, option: Option | None = None) -> int:
        """What stage ``i``'s forward adds, at its worst, to the live total when it began; for
        the re-run of a selective ``option``, the live total without its kept outputs."""
        stage = self.stages[i]
        made = 0 if stage.aliases_input else stage.output_bytes
        transient = stage.forward_peak_bytes if option is None else option.rerun_peak_bytes
        return max(transient, made + stage.tape_bytes)

    def backward_moment_bytes(self, i: int) -> int:
        """What stage ``i``'s backward adds, at its worst, to the live total when it began."""
        stage = self.stages[i]
        if stage.aliases_input:
            return stage.backward_peak_bytes
        return max(stage.backward_peak_bytes, self.act_bytes(i))

    def forward_held_total(self) -> int:
        """What every stage's first forward leaves alive until the forward returns."""
        return sum(s.forward_held_bytes for s in self.stages)

    def grad_bytes(self, j: int) -> int:
        """Size of ``d_j``: that of ``x_j``, but for ``d_n`` when it was measured apart."""
        if j == len(self.stages) and self.output_grad_bytes is not None:
            return self.output_grad_bytes
        return self.act_bytes(j)

    def loss_moment_bytes(self) -> int:
        """The loss's moment over the live total at the end of the forward."""
        n = len(self.stages)
        return self.grad_bytes(n) if self.loss_peak_bytes is None else self.loss_peak_bytes

    def freed_grad_bytes(self, i: int) -> int:
        """What stage ``i``'s backward frees of its output's gradient ``d_{i+1}``: all of it,
        but for the last stage when ``d_n`` is held to the end (``output_grad_held``)."""
        if i == len(self.stages) - 1 and self.output_grad_held:
            return 0
        return self.grad_bytes(i + 1)

    def loss_left_bytes(self) -> int:
        """What the loss leaves live when the backward starts, ``d_n`` included (never less than
        ``d_n``, which the last stage's backward frees)."""
        d_n = self.grad_bytes(len(self.stages))
        return d_n if self.loss_residual_bytes is None else max(d_n, self.loss_residual_bytes)

    def option_of(self, segment: Segment) -> Option | None:
        """The selective option a checkpointed ``segment`` runs (``Segment.option``), if any:
        the op outputs it keeps from its first run to its re-run, its input apart."""
        if not segment.option:
            return None
        return self.stages[segment.start].options[segment.option - 1]

    def checkpointable(self, start: int, stop: int) -> bool:
        """Whether stages ``start..stop-1`` may form a checkpointed segment (none is pinned)."""
        return not any(s.pinned for s in self.stages[start:stop])

    def atoms(self) -> list[tuple[int, int]]:
        """The smallest runs of stages a plan may split the chain into: each aliasing stage is
        glued to the one before it, so that no checkpoint starts with an in-place op or a view
        of the previous stage's output."""
        bounds: list[tuple[int, int]] = []
        for i, stage in enumerate(self.stages):
            if bounds and stage.aliases_input:
                bounds[-1] = (bounds[-1][0], i + 1)
            else:
                bounds.append((i, i + 1))
        return bounds

    def checkpoint_atoms(self) -> list[tuple[int, int]]:
        """The atoms ``checkpoint_sequential`` may split, from the first one that is not pinned
        (a pinned prefix stays kept before them)."""
        atoms = self.atoms()
        while atoms and not self.checkpointable(*atoms[0]):
            atoms = atoms[1:]
        return atoms or self.atoms()[-1:]

    @classmethod
    def from_stage_stats(
        cls,
        stats: Sequence[StageStats],
        *,
        fixed_bytes: int,
        cost_model: str = "flops",
        rates: Rates | None = None,
        pointwise: Mapping[Probe, float] | None = None,
        mapped_s_per_byte: float = 0.0,
        loss_peak_bytes: int | None = None,
        loss_residual_bytes: int | None = None,
        optimizer_peak_bytes: int = 0,
        output_grad_held: bool = False,
        output_grad_bytes: int | None = None,
        rng_state_bytes: int = 0,
    ) -> Chain:
        """The chain of a traced step, priced by ``cost_model`` (``memprop.plan.costs``):
        ``roofline`` in seconds at ``rates`` (pointwise calls at their ``pointwise`` seconds
        per element beyond their bytes, storages mapped fresh at ``mapped_s_per_byte``: NOTE
        [ Storages the CPU maps fresh ] in ``memprop.trace.stages``), ``flops`` in counted
        floating-point operations,
        ``measured`` in the stages' timed seconds. Blocks whose ops were logged get their
        selective options (``memprop.plan.selective``)."""
        check_cost_model(cost_model)
        if cost_model == "roofline" and rates is None:
            raise UsageError("the roofline cost model needs the machine's rates")
        price = _Pricing(cost_model, rates, pointwise or {}, mapped_s_per_byte)
        stages = tuple(price.stage(s) for s in sorted(stats, key=lambda s: s.index))
        # Persistent storages (a cache a block returns) are held from their stage's forward to
        # the end of the step, whatever the plan: counted as held throughout, which over-states
        # the moments of the forward before them by their size, never under-states one.
        persistent = sum(s.persistent_bytes for s in stats)
        return cls(
            stages=stages,
            fixed_bytes=fixed_bytes + persistent,
            cost_model=cost_model,
            cost_note=price.note(),
            loss_peak_bytes=loss_peak_bytes,
            loss_residual_bytes=loss_residual_bytes,
            optimizer_peak_bytes=optimizer_peak_bytes,
            output_grad_held=output_grad_held,
            output_grad_bytes=output_grad_bytes,
            rng_state_bytes=rng_state_bytes,
        )

    @classmethod
    def from_chain_costs(cls, costs: ChainCosts, cost_model: str = "flops",
                         rates: Rates | None = None,
                         pointwise: Mapping[Probe, float] | None = None,
                         device: str | None = None, mapped_s_per_byte: float = 0.0) -> Chain:
        """The chain of a profile (``profile.chain``), with the loss's and the optimizer's
        moments: its unplanned peak is the ledger's traced peak. On ``device``, checkpoints
        keep the generators' state at its size there (:func:`rng_state_bytes_on`)."""
        return cls.from_stage_stats(
            costs.stages,
            fixed_bytes=costs.fixed_bytes,
            cost_model=cost_model,
            rates=rates,
            pointwise=pointwise,
            mapped_s_per_byte=mapped_s_per_byte,
            loss_peak_bytes=costs.loss_peak_bytes,
            loss_residual_bytes=costs.loss_residual_bytes,
            optimizer_peak_bytes=costs.optimizer_peak_bytes,
            output_grad_held=costs.output_grad_held,
            output_grad_bytes=costs.output_grad_bytes,
            rng_state_bytes=0 if device is None else rng_state_bytes_on(device),
        )


def rng_state_bytes_on(device: str) -> int:
    """What ``torch.utils.checkpoint`` keeps of the generators' state on ``device`` for a
    re-run (``preserve_rng_state``): the CPU generator's state (``torch.get_rng_state()``) when
    the step runs on the CPU; nothing on other devices, whose states it keeps in host memory."""
    return torch.get_rng_state().nbytes if torch.device(device).type == "cpu" else 0


class _Pricing:
    """Stage and op costs under one cost model (``memprop.plan.costs``)."""

    def __init__(self, cost_model: str, rates: Rates | None,
                 pointwise: Mapping[Probe, float], mapped_s_per_byte: float = 0.0) -> None:
        self.cost_model, self.rates, self.pointwise = cost_model, rates, pointwise
        self.mapped_s_per_byte = mapped_s_per_byte

    def stage(self, s: StageStats) -> Stage:
        """The chain's stage for ``s``, priced, with its selective options."""
        stage = Stage(
            name=s.name,
            forward_cost=self._phase(s.flops, s.forward_s, s.forward_moved_bytes,
                                     s.forward_ops, s.forward_pointwise,
                                     s.forward_mapped_bytes),
            backward_cost=self._phase(s.backward_flops, s.backward_s, s.backward_moved_bytes,
                                      s.backward_ops, s.backward_pointwise,
                                      s.backward_mapped_bytes),
            input_bytes=s.input_bytes,
            output_bytes=s.output_bytes,
            saved_bytes=s.saved_bytes,
            saves_input=s.saves_input,
            saves_output=s.saves_output,
            forward_peak_bytes=s.forward_peak_bytes,
            backward_peak_bytes=s.backward_peak_bytes,
            gradient_bytes=s.gradient_bytes,
            aliases_input=s.aliases_input,
            pinned=s.pinned,
            forward_held_bytes=s.forward_held_bytes,
            draws_random=s.draws_random,
        )
        if s.pinned:
            return stage
        return dataclasses.replace(stage, options=options(
            s.ops, self._op_costs(s), tape_bytes=stage.tape_bytes,
            forward_peak_bytes=s.forward_peak_bytes, forward_cost=stage.forward_cost,
            overhead=self.selective_overhead(s)))

    def _phase(self, flops: int, seconds: float, moved: int, ops: int,
               pointwise: Sequence[tuple[Probe, int]], mapped: int) -> float:
        """A forward or a backward: its FLOPs, its timed seconds, or its roofline price."""
        if self.cost_model == "flops":
            return float(flops)
        if self.cost_model == "measured" or self.rates is None:
            return float(seconds)
        return (self.rates.seconds(flops, moved, ops) + self._beyond_bytes(pointwise)
                + mapped * self.mapped_s_per_byte)

    def _beyond_bytes(self, made: Sequence[tuple[Probe, int]]) -> float:
        return sum(self.pointwise.get(probe, 0.0) * elements for probe, elements in made)

    def _op_costs(self, s: StageStats) -> Callable[[BlockOp], float]:
        """The price of an op of stage ``s``'s forward, in the stage's unit. Measured stage
        times are shared among their ops in proportion to the ops' roofline prices."""
        if self.cost_model == "flops":
            return lambda op: float(op.flops)
        rates = self.rates or _UNIT_RATES
        if self.cost_model == "roofline":
            return lambda op: rates.seconds(op.flops, op.moved_bytes, 1) + self._beyond_bytes(
                () if op.probe is None else ((op.probe, op.elements),))
        total = sum(rates.seconds(o.flops, o.moved_bytes) for o in s.ops)
        share = s.forward_s / total if total else 0.0
        return lambda op: share * rates.seconds(op.flops, op.moved_bytes)

    def selective_overhead(self, s: StageStats) -> float:
        """What running stage ``s`` under a selective policy adds (its dispatch modes, per op,
        first run and re-run), in the stage's unit; FLOPs do not see it."""
        if self.cost_model != "roofline" or self.rates is None:
            return 0.0
        return self.rates.selective_op_s * len(s.ops)

    def note(self) -> str:
        if self.cost_model == "flops":
            return "recomputation priced in counted FLOPs"
        if self.cost_model == "measured":
            return "recomputation priced in the stages' measured times"
        assert self.rates is not None
        timed = sum(1 for v in self.pointwise.values() if v > 0)
        extra = (f"; {timed} pointwise calls that cost more than their bytes timed here"
                 if timed else "")
        return (f"recomputation priced by FLOPs and bytes moved at {self.rates.describe()}"
                f"{extra}")


_UNIT_RATES = Rates(flops_per_s=1e11, bytes_per_s=1e10, op_s=0.0, selective_op_s=0.0,
                    source="a proportion only")
