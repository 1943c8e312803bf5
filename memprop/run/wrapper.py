"""``memprop.checkpoint``: the user's model, run under a plan, re-planned when the inputs change.

The wrapper holds the model itself (the same parameter and buffer objects, so an optimizer built
before or after it works) and presents the model's own ``state_dict`` keys: it saves and loads
checkpoints interchangeably with the bare model. Its forward installs the plan on the model's
blocks (:func:`memprop.run.install.installed`) and calls the model, so the model's own
forward, hooks and loss code run unchanged. It pickles (``torch.save(wrapped)``) whenever the
bare model does (a loss function pickle cannot take is left behind, and said so if a new input
shape needs it), and it may be called from several threads at once (NOTE [ Plans installed per
thread ] in ``memprop.run.install``). A model whose Hugging Face gradient checkpointing is on
has it turned off while the plan runs (the plan replaces it; recomputing twice would cost
twice), with a warning.

Plans are kept by the inputs' shapes, dtypes and devices. An input never seen before reuses the
plan of one whose every dimension is at least as large (the same plan peaks no higher on smaller
tensors), and is otherwise planned on first sight on fake tensors, pricing recomputation in
FLOPs, so planning allocates nothing; a model that fake tensors cannot trace (its forward
branches on values, as a mixture of experts' eager routing does) is planned on the real inputs
in hand instead, as ``memprop run`` plans it, with a warning. At most ``MAX_PLANS`` are kept,
the least recently used dropped first. Every new plan is checked before it runs: the planned
step is traced on fake tensors (:func:`memprop.run.verify.verify_plan`); a planned forward that
never runs the plan raises :class:`memprop.errors.PlanCheckError`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import pickle
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import nn

from memprop.blame import is_fake_kernel_refusal, is_fake_tensor_limit
from memprop.errors import MemPropError, PlanCheckError, UsageError
from memprop.plan.api import check_strategy, plan
from memprop.plan.compiled import plan_compiled
from memprop.plan.costs import DEFAULT_COST_MODEL, check_cost_model, on_fake_tensors
from memprop.plan.solvers import Plan
from memprop.run.compiled import CompiledPlanModule, compiled_module
from memprop.run.install import installed
from memprop.run.measure import not_run
from memprop.run.scratch import (
    Scratch,
    measure_scratch,
    plan_around,
    scratch_line,
    unmeasured_note,
)
from memprop.run.verify import verify_plan
from memprop.trace.compiled import original
from memprop.trace.fake import new_fake_mode, to_fake_workload
from memprop.units import parse_size
from memprop.workload import Inputs, Workload, to_workload

__all__ = ["MAX_PLANS", "PlannedModule", "checkpoint"]

_PREFIX = "module."
MAX_PLANS = 16
"""Plans a wrapper keeps, one per input shape; the least recently used goes first."""
InputKey = tuple[tuple[str, tuple[int, ...], torch.dtype, torch.device], ...]


def _key(inputs: tuple[Any, ...], keywords: dict[str, Any]) -> InputKey:
    """The inputs' names (a position or a keyword), shapes, dtypes and devices."""
    named = [*((str(i), t) for i, t in enumerate(inputs)), *sorted(keywords.items())]
    return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in named
                 if isinstance(t, torch.Tensor))


def _covers(big: InputKey, small: InputKey) -> bool:
    """Whether every input of ``small`` is no larger, dimension by dimension, than ``big``'s."""
    return len(big) == len(small) and all(
        (b[0], *b[2:]) == (s[0], *s[2:]) and len(b[1]) == len(s[1])
        and all(x >= y for x, y in zip(b[1], s[1], strict=True))
        for b, s in zip(big, small, strict=True)
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class _TargetsLike:
    """The shape of the targets given at construction, to make fake ones for a new batch."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    batch_first: bool
    """Whether the first dimension was the batch (it then follows the new inputs')."""

    def fake(self, batch: int | None) -> torch.Tensor:
        shape = self.shape
        if self.batch_first and batch is not None:
            shape = (batch, *shape[1:])
        return torch.zeros(shape, dtype=self.dtype, device=self.device)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Planner:
    """How to plan for new inputs: plain settings (no tensors, no closures), so that the
    wrapper pickles and holds no batch alive."""

    budget_bytes: int
    strategy: str
    cost_model: str
    """``roofline`` or ``flops``: later shapes are planned on fake tensors, which ``measured``
    cannot price."""
    loss_fn: Any
    targets: _TargetsLike | None
    optimizer_class: type[torch.optim.Optimizer] | None
    optimizer_groups: tuple[tuple[dict[str, Any], tuple[int, ...]], ...]
    """Each parameter group's settings and its parameters' positions in ``parameters()``."""
    set_to_none: bool
    blocks: str | None
    chunk_head: bool

    def __call__(self, model: nn.Module, inputs: tuple[Any, ...],
                 keywords: dict[str, Any]) -> Plan:
        mode = new_fake_mode()
        parameters = list(model.parameters())
        optimizer = None
        if self.optimizer_class is not None:
            optimizer = self.optimizer_class([  # type: ignore[call-arg]
                {**settings, "params": [parameters[i] for i in positions]}
                for settings, positions in self.optimizer_groups
            ])
        real = Workload(model=model, inputs=tuple(inputs), keywords=dict(keywords),
                        loss_fn=self.loss_fn, optimizer=optimizer, name=type(model).__name__,
                        set_to_none=self.set_to_none, blocks=self.blocks,
                        chunk_head=self.chunk_head)
        fake = to_fake_workload(real, mode)
        if self.targets is not None:
            tensors = real.input_tensors
            with mode:
                fake.targets = self.targets.fake(int(tensors[0].shape[0]) if tensors and
                                                 tensors[0].dim() else None)
        # fake=True: sizes that depend on values at their worst case (a mixture of experts'
        # routing), since a wrapper's forward cannot trace a real step to plan.
        try:
            result = plan(fake, budget=self.budget_bytes, strategy=self.strategy,
                          cost_model=self.cost_model, fake=True)
        except MemPropError as error:
            if not (is_fake_tensor_limit(error) or is_fake_kernel_refusal(error)):
                raise
            return self._plan_real(real, error)
        verify_plan(fake, result)
        return result

    def _plan_real(self, real: Workload, refusal: MemPropError) -> Plan:
        """The plan made on the real inputs in hand, for a model fake tensors cannot trace (it
        branches on values, as a mixture of experts' eager routing does; a fake kernel stricter
        than the real one), as ``memprop run`` plans it: one real step, the model put back after
        it (``memprop.plan``). Said with a warning: planning allocates, and the plan holds for
        this routing, not the worst case."""
        warnings.warn(
            f"{real.name} was planned on its real inputs, not fake tensors: fake tensors cannot "
            f"trace it ({refusal}); planning ran one real step (its memory allocated, the model "
            "put back after it), and the plan is this batch's routing, not the worst case",
            stacklevel=4)
        if self.targets is not None:  # zeros of the targets' shape (real, outside a fake mode)
            tensors = real.input_tensors
            real.targets = self.targets.fake(int(tensors[0].shape[0]) if tensors and
                                             tensors[0].dim() else None)
        result = plan(real, budget=self.budget_bytes, strategy=self.strategy,
                      cost_model=self.cost_model)
        verify_plan(real, result)
        return result

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with a loss function that pickle cannot take (a lambda, a closure) replaced
        by one that says so if a new input shape needs it: the wrapper pickles whenever its
        model does, and the plans it made still run."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.loss_fn is not None:
            try:
                pickle.dumps(self.loss_fn)
            except Exception as error:  # pickle raises many kinds: each means "cannot"
                settings["loss_fn"] = _UnpickledLoss(f"{self.loss_fn!r} ({error})")
        return (_planner_from, (settings,))

    def __deepcopy__(self, memo: dict[int, Any]) -> _Planner:
        # A copy keeps the loss function, whatever pickle thinks of it.
        return dataclasses.replace(self, loss_fn=copy.deepcopy(self.loss_fn, memo))


def _planner_from(settings: dict[str, Any]) -> _Planner:
    return _Planner(**settings)


class _UnpickledLoss:
    """The loss function of a pickled wrapper that pickle could not take: the plans made before
    still run; a new input shape, which needs the loss to be planned, says why it cannot."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __call__(self, *args: Any) -> Any:
        raise UsageError(
            f"this memprop.checkpoint wrapper was pickled without its loss_fn, {self.what}: "
            "pickle cannot store a lambda or a closure, and a new input shape needs the loss to "
            "be planned. Give loss_fn as a function defined at module level (or an nn.Module), "
            "or call memprop.checkpoint again after loading")


class PlannedModule(nn.Module):
    """``module`` whose training forward runs under the plan for its inputs' shapes."""

    def __init__(self, module: nn.Module, planner: _Planner) -> None:
        super().__init__()
        self.module = module
        self._planner = planner
        self.plans: OrderedDict[InputKey, Plan] = OrderedDict()
        """The plans in use, by the inputs' (shape, dtype, device), most recent last."""
        self.scratch: Scratch | None = None
        """The kernels' scratch the first inputs' plan was made around (``cost_model=
        "measured"`` measures it on a real step); None: planned on fake tensors alone, which
        cannot measure it."""
        self._plans_lock = threading.RLock()
        """Held while the plans are looked up or made: threads share them (NOTE [ Plans
        installed per thread ] in ``memprop.run.install``)."""
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    @property
    def notes(self) -> tuple[str, ...]:
        """What the plans' budget counts of the kernels' scratch, in one line each."""
        if self.scratch is None:
            return (unmeasured_note(),)
        said = (scratch_line(self.scratch, self._planner.budget_bytes),) \
            if self.scratch.bytes else ()
        return (*said, "later input shapes, planned on fake tensors, exclude it")

    def plan_for(self, *inputs: Any, **keywords: Any) -> Plan:
        """The plan for these inputs: one already made for inputs at least as large, or a new
        one, checked before it is used (once, whichever thread asks first)."""
        key = _key(inputs, keywords)
        with self._plans_lock:
            found = self.plans.get(key)
            if found is None:
                found = next((p for k, p in reversed(self.plans.items()) if _covers(k, key)),
                             None)
            if found is None:
                found = self._planner(self.module, inputs, keywords)
            self.plans[key] = found
            self.plans.move_to_end(key)
            while len(self.plans) > MAX_PLANS:
                self.plans.popitem(last=False)
            return found

    def __getstate__(self) -> dict[str, Any]:
        """All but the lock (pickled and deep-copied wrappers make their own); the plans made
        so far go along, and the planner as :meth:`_Planner.__reduce__` pickles it."""
        state = dict(self.__dict__)
        state.pop("_plans_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans_lock = threading.RLock()

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self.module(*inputs, **kwargs)
        chosen = self.plan_for(*inputs, **kwargs)
        # A compiled model runs its original module under the plan, eagerly, as it was planned
        # (NOTE [ Compiled models are traced eagerly ] in memprop.trace.compiled).
        module = original(self.module)
        with _without_hf_checkpointing(module), \
                installed(module, chosen.stage_names, chosen.tree, chosen.selective,
                          chosen.draws_random, head_chunks=chosen.head_chunks) as calls:
            output = module(*inputs, **kwargs)
        if calls.expected and calls.count == 0:
            raise PlanCheckError(not_run(self.module, chosen))
        return output


@contextlib.contextmanager
def _without_hf_checkpointing(model: nn.Module) -> Iterator[None]:
    """Hugging Face models checkpoint their layers themselves once
    ``gradient_checkpointing_enable()`` was called (a ``gradient_checkpointing`` flag on the
    layers or their container): off while memprop's plan runs, back on after."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if flagged:
        warnings.warn(f"{type(model).__name__} has Hugging Face gradient checkpointing on: it is "
                      "turned off while memprop's plan runs (the plan recomputes what it must; "
                      "both would recompute twice)", stacklevel=3)
    for module in flagged:
        setattr(module, "gradient_checkpointing", False)  # noqa: B010 (a plain attribute)
    try:
        yield
    finally:
        for module in flagged:
            setattr(module, "gradient_checkpointing", True)  # noqa: B010


def _strip_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                  local_metadata: Any) -> None:
    _rename(state_dict, prefix + _PREFIX, prefix)


def _add_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if not any(k.startswith(prefix + _PREFIX) for k in state_dict):
        _rename(state_dict, prefix, prefix + _PREFIX)


def _rename(state_dict: dict[str, Any], old: str, new: str) -> None:
    # In place and in order: the caller owns the dict. Its _metadata (BatchNorm's version, for
    # one) is keyed by module prefixes without the trailing dot, renamed alike.
    def renamed(key: str, old: str, new: str) -> str:
        if key == old.rstrip("."):
            return new.rstrip(".")
        return new + key[len(old):] if key.startswith(old) else key

    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[renamed(key, old, new)] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        entries = list(metadata.items())
        metadata.clear()
        for key, value in entries:
            metadata[renamed(key, old, new)] = value


@overload
def checkpoint(model: nn.Module, inputs: Inputs, budget: int | str, strategy: str = ...,
               cost_model: str = ..., *, loss_fn: Any = ..., targets: torch.Tensor | None = ...,
               optimizer: torch.optim.Optimizer | None = ..., set_to_none: bool = ...,
               blocks: str | None = ..., chunk_head: bool = ...,
               compile: Literal[False] = ...) -> PlannedModule: ...


@overload
def checkpoint(model: nn.Module, inputs: Inputs, budget: int | str, strategy: str = ...,
               cost_model: str = ..., *, loss_fn: Any = ..., targets: torch.Tensor | None = ...,
               optimizer: torch.optim.Optimizer | None = ..., set_to_none: bool = ...,
               blocks: str | None = ..., chunk_head: bool = ...,
               compile: Literal[True]) -> CompiledPlanModule: ...


def checkpoint(
    model: nn.Module,
    inputs: Inputs,
    budget: int | str,
    strategy: str = "optimal",
    cost_model: str = DEFAULT_COST_MODEL,
    *,
    loss_fn: Any = None,
    targets: torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    set_to_none: bool = True,
    blocks: str | None = None,
    chunk_head: bool = False,
    compile: bool = False,
) -> PlannedModule | CompiledPlanModule:
    """``model`` wrapped so that every step of its training loop keeps under ``budget`` (bytes
    or a size such as ``"2GiB"``), planned now for ``inputs`` and again for larger inputs.

    The planner must see the step as the loop runs it, so give what the loop uses:

    - ``loss_fn``: called as ``loss_fn(output, targets)`` (or ``loss_fn(output)`` without
      targets); without one the loss is ``output.float().mean()``.
    - ``targets``: a batch of targets like the loop's (only their shape and dtype are kept; a
      first dimension equal to the batch follows the batch of later inputs).
    - ``optimizer``: its state (Adam's two moments, SGD's momentum) is live through every step
      from the second on, and the plan keeps room for it; only its class and settings are kept.
    - ``set_to_none``: how the loop zeroes gradients, ``zero_grad(set_to_none=...)``.
    - ``chunk_head``: let the plans compute a Hugging Face causal LM's head and loss in chunks
      of tokens (NOTE [ The head option ] in ``memprop.plan.chain``); the model's output
      ``logits`` is then a zero view, so give it only to a loop that reads the loss alone.

    ``cost_model`` prices recomputation (``memprop.plan.costs``). ``"roofline"`` (the default)
    and ``"flops"`` plan on fake tensors: nothing is allocated, which matters when the unplanned
    step does not fit. ``"measured"`` traces real steps for the first plan (the model is put
    back as it was); later shapes are then planned by the roofline. Every plan is checked on
    fake tensors before it runs (:func:`memprop.run.verify.verify_plan`). Kernels allocate
    scratch inside one op that fake tensors cannot see (oneDNN's in a CPU convolution, cuDNN's
    workspaces): ``"measured"`` measures it on a real step and plans the first inputs for the
    budget less it; plans made on fake tensors exclude it. The wrapper's ``notes`` say which
    (NOTE [ Scratch the ledger cannot see ] in ``memprop.run.scratch``).

    A model that is already a checkpoint's wrapper is planned afresh on the model it wraps: the
    new budget replaces the old one (one step runs one plan). A ``torch.compile``'d model is
    planned, and runs its plans, on its original module (NOTE [ Compiled models are traced
    eagerly ] in ``memprop.trace.compiled``).

    ``compile=True`` plans and runs the step ``torch.compile``'d instead
    (``memprop.plan.compiled``): the partitioner's ``activation_memory_budget`` and the head
    option (with ``chunk_head``) are chosen for ``budget``, each candidate traced on fake
    tensors, and the returned :class:`memprop.run.compiled.CompiledPlanModule` compiles the
    model under them (its ``plan`` says which). It is planned for ``inputs``' shapes; the
    strategy does not apply (the partitioner recomputes), and the cost model prices the graphs
    (``roofline`` or ``flops``).
    """
    while isinstance(model, (PlannedModule, CompiledPlanModule)):
        model = model.module
    first = to_workload(model, inputs, loss_fn=loss_fn, targets=targets, optimizer=optimizer,
                        set_to_none=set_to_none, blocks=blocks, chunk_head=chunk_head)
    budget_bytes = parse_size(budget)
    if compile:
        check_cost_model(cost_model)
        return compiled_module(model, plan_compiled(
            first, budget_bytes, chunk_head=chunk_head, cost_model=on_fake_tensors(cost_model)))
    check_strategy(strategy)
    check_cost_model(cost_model)
    positions = {id(p): i for i, p in enumerate(model.parameters())}
    planner = _Planner(
        budget_bytes=budget_bytes,
        strategy=strategy,
        cost_model=on_fake_tensors(cost_model),
        loss_fn=loss_fn,
        targets=None if targets is None else _TargetsLike(
            shape=tuple(targets.shape), dtype=targets.dtype, device=targets.device,
            batch_first=bool(targets.dim()) and first.batch_size is not None
            and targets.shape[0] == first.batch_size),
        optimizer_class=None if optimizer is None else type(optimizer),
        optimizer_groups=() if optimizer is None else tuple(
            ({k: v for k, v in group.items() if k != "params"},
             tuple(positions[id(p)] for p in group["params"]))
            for group in optimizer.param_groups),
        set_to_none=set_to_none,
        blocks=first.blocks,
        chunk_head=chunk_head,
    )
    wrapper = PlannedModule(model, planner)
    if cost_model == "measured":
        # Real steps run anyway: one more measures the kernels' scratch (NOTE [ Scratch the
        # ledger cannot see ] in memprop.run.scratch), and the plan is made around it.
        scratch = measure_scratch(first)
        measured = plan_around(lambda cap: plan(first, budget=cap, strategy=strategy,
                                                cost_model="measured"), budget_bytes, scratch)
        verify_plan(first, measured)
        wrapper.scratch = scratch
        wrapper.plans[_key(first.inputs, first.keywords)] = measured
    else:
        wrapper.plan_for(*first.inputs, **first.keywords)
    return wrapper
