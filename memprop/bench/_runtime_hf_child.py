"""The Hugging Face GPT-2 case of the runtime benchmark, run whole in a child process
(``memprop.bench._runtime_hf`` starts it): its contenders, eager and compiled, measured and timed
in one process, so that every ratio of the case is between medians of interleaved steps.

The contenders: the eager step unplanned; Hugging Face's ``gradient_checkpointing_enable()``;
memprop's eager plans (``optimal``) with the model's own head and with the head option
(``memprop.trace.head``); ``torch.compile`` (inductor) unplanned and under
``activation_memory_budget``; memprop's plan of the compiled step, where memprop has one
(``_compiled_plan``); memprop's plan at the largest batch that fits the unplanned eager peak.
Compiling comes first (each contender's first step), then the peaks, then the interleaved
timing of all of them.

Each compiled contender is its own ``torch.compile`` with a backend of its own (NOTE [ One
compiled contender, one backend ] in ``memprop.bench._runtime_compile``). Peaks: the allocator's
own count over a steady-state step, for eager and compiled steps alike (NOTE [ The peak of a
compiled step ] there); never the ledger, which does not see inductor's buffers. The child
writes its document after every measurement, so what it measured before its time cap survives
it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memprop.bench._runtime_compile import own_compiled, steady_peak_bytes
from memprop.bench._runtime_workloads import HF_GPT2, adamw, build
from memprop.bench.common import interleaved_medians
from memprop.loop import training_step, zero_gradients
from memprop.plan.api import chain_of
from memprop.plan.chain import Chain
from memprop.plan.solvers import Plan, solve
from memprop.run.install import installed
from memprop.search import largest_true
from memprop.trace.profile import profile
from memprop.units import format_bytes
from memprop.workload import Workload

__all__: list[str] = []

BATCH_SLOWDOWN = 1.3
"""The largest batch's plan is searched for at a predicted step of at most this much the
unplanned step's time per sample (the goal's bound)."""


BATCH_LIMIT = 8
"""The largest batch is searched up to this many times the case's batch: enough for the goal's
3x, and each step at the limit takes that many times the case's."""
LARGEST = "memprop, batch "
"""The largest batch's contender: this, then the batch."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Spec:
    quick: bool
    batch: int
    repeats: int
    budgets: tuple[float, ...]
    """``activation_memory_budget`` values of the compiled contenders."""
    backend: str
    """``inductor``, or ``aot_eager_decomp_partition`` (quick: the same partitioner, no code
    generation, so a test covers the compiled paths in seconds)."""


@dataclass(kw_only=True, slots=True, eq=False)
class _Entry:
    contender: str
    setting: str
    compiled: bool
    workload: Workload
    context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    """Installed around each step (a plan, Hugging Face's checkpointing)."""
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_overhead: float | None = None
    head_chunks: int = 0
    compile_s: float | None = None
    peak_bytes: int | None = None

    def run(self) -> None:
        """A step from the gradients as they are."""
        with self.context():
            training_step(self.workload)

    def step(self) -> None:
        """A step of the loop: gradients freed, then the step."""
        zero_gradients(self.workload)
        self.run()

    def row(self) -> dict[str, Any]:
        return {"contender": self.contender, "setting": self.setting,
                "compiled": self.compiled, "batch": self.workload.batch_size,
                "budget_bytes": self.budget_bytes,
                "predicted_peak_bytes": self.predicted_peak_bytes,
                "predicted_overhead": self.predicted_overhead, "head_chunks": self.head_chunks,
                "allocator_peak_bytes": self.peak_bytes, "compile_s": self.compile_s}


def _measure(entry: _Entry) -> None:
    """Compile (the first step) and the allocator's peak over a steady-state step."""
    started = time.perf_counter()
    entry.step()  # compiles a compiled contender; makes the optimizer's state in any case
    if entry.compiled:
        entry.compile_s = time.perf_counter() - started
    entry.peak_bytes = steady_peak_bytes(entry.workload, entry.run)


def _compiled(workload: Workload, budget: float, backend: str) -> _Entry:
    import torch._functorch.config as functorch_config

    def patched() -> AbstractContextManager[Any]:
        # Around every step, not the first alone: a recompile (a guard that fails) reads the
        # budget again.
        patch: AbstractContextManager[Any] = functorch_config.patch(
            activation_memory_budget=budget)
        return patch

    compiled = own_compiled(workload.model, backend)
    entry = _Entry(contender="torch.compile", setting=f"activation_memory_budget={budget}",
                   compiled=True, workload=dataclasses.replace(workload, model=compiled),
                   context=patched)
    _measure(entry)
    return entry


def _hf_checkpointing(workload: Workload) -> _Entry:
    """Hugging Face's checkpointing, on a copy of the model with an optimizer of its own: HF's
    ``gradient_checkpointing_enable()`` also hooks the input embeddings so that their output
    requires grad, and ``gradient_checkpointing_disable()`` leaves that hook, so turning it on
    and off around each step would add a hook a step (and a recompile to every compiled
    contender of the same model)."""
    model: Any = copy.deepcopy(workload.model)
    with warnings.catch_warnings():  # transformers 5 calls it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        # use_reentrant=False: torch's recommended form.
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    own = dataclasses.replace(workload, model=model, optimizer=adamw(model))
    return _Entry(contender="HF checkpointing", setting="gradient_checkpointing_enable()",
                  compiled=False, workload=own)


def _planned(workload: Workload, plan: Plan, contender: str, setting: str) -> _Entry:
    def context() -> AbstractContextManager[Any]:
        return installed(workload.model, plan.stage_names, plan.tree, plan.selective,
                         plan.draws_random, head_chunks=plan.head_chunks)

    return _Entry(contender=contender, setting=setting, compiled=False, workload=workload,
                  context=context, budget_bytes=plan.budget_bytes,
                  predicted_peak_bytes=plan.peak_bytes,
                  predicted_overhead=plan.compute_overhead, head_chunks=plan.head_chunks)


def _own_head(chain: Chain) -> Chain:
    return dataclasses.replace(chain, heads=())


def _eager_plans(workload: Workload, chain: Chain, budgets: dict[str, int]) -> list[_Entry]:
    """memprop's eager plans at each budget, with the model's own head and with the head
    option (the planner's choice between the two chains; where it keeps the model's own head
    the second plan is the first, and is not run twice)."""
    entries = []
    for label, budget in budgets.items():
        own = solve(_own_head(chain), budget, "optimal", strict=False)
        with_head = solve(chain, budget, "optimal", strict=False)
        setting = f"{label}: budget {format_bytes(budget)}"
        if own.feasible:
            entries.append(_planned(workload, own, "memprop", setting))
        if with_head.feasible and with_head.head_chunks:
            entries.append(_planned(workload, with_head, "memprop, head option", setting))
    return entries


def _largest_batch(spec: _Spec, budget_bytes: int) -> tuple[_Entry | None, str]:
    """memprop's eager plan (head option allowed) at the largest batch whose plan fits
    ``budget_bytes`` at a predicted step of at most ``BATCH_SLOWDOWN`` the unplanned one, per
    sample; found on fake tensors, by doubling then bisection."""
    def chain_at(batch: int) -> Chain:
        return chain_of(build(HF_GPT2, batch, quick=spec.quick), cost_model="roofline")

    def fits(batch: int) -> bool:
        plan = solve(chain_at(batch), budget_bytes, "optimal", strict=False)
        return plan.feasible and 1 + plan.compute_overhead <= BATCH_SLOWDOWN

    if not fits(spec.batch):
        return None, "no plan at the case's own batch fits its unplanned peak"
    chosen = largest_true(fits, start=spec.batch, limit=BATCH_LIMIT * spec.batch,
                          resolution=max(1, spec.batch // 8))
    workload = build(HF_GPT2, chosen, quick=spec.quick)
    plan = solve(chain_of(workload, cost_model="roofline"), budget_bytes, "optimal")
    return _planned(workload, plan, f"{LARGEST}{chosen}",
                    f"largest batch: budget {format_bytes(budget_bytes)}"), ""


@dataclass(slots=True)
class _CompiledPlanner:
    """memprop's plans of the compiled step (``memprop.plan.compiled``, issue 18 item 2), their
    fake-tensor probes shared between budgets."""

    workload: Workload
    probes: Any = None

    def entry(self, budget_bytes: int, label: str) -> tuple[_Entry | None, str]:
        """The compiled plan's contender under ``budget_bytes``, or why there is none."""
        try:
            from memprop.plan.compiled import CompiledProbes, plan_compiled
            from memprop.run.compiled import compiled_module
        except ImportError:
            return None, COMPILED_PLAN_MISSING
        from memprop.errors import MemPropError

        if self.probes is None:
            self.probes = CompiledProbes()
        try:
            plan = plan_compiled(self.workload, budget_bytes, chunk_head=True,
                                 probes=self.probes)
        except MemPropError as error:  # a budget below every candidate, a step it refuses
            return None, str(error)
        # On a copy of the model with an optimizer of its own: the module installs the head
        # option on the model it runs for as long as it lives, which the other contenders of
        # the model must not run under.
        own = copy.deepcopy(self.workload.model)
        head = f", head in {plan.head_chunks} chunks" if plan.head_chunks else ""
        return _Entry(
            contender=COMPILED_PLAN, compiled=True,
            setting=f"{label}: budget {format_bytes(budget_bytes)}, "
                    f"activation_memory_budget={plan.activation_memory_budget:g}{head}",
            workload=dataclasses.replace(self.workload, model=compiled_module(own, plan),
                                         optimizer=adamw(own)),
            budget_bytes=budget_bytes, predicted_peak_bytes=plan.predicted_peak_bytes,
            predicted_overhead=plan.compute_overhead, head_chunks=plan.head_chunks), ""


COMPILED_PLAN = "memprop compiled"
COMPILED_PLAN_MISSING = "memprop cannot plan a compiled step in this version (issue 18, item 2)"


def _run(spec: _Spec, out: Path) -> None:
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # one entry per compiled contender
    workload = build(HF_GPT2, spec.batch, quick=spec.quick)
    document: dict[str, Any] = {"rows": [], "notes": []}
    entries: list[_Entry] = []

    def done(entry: _Entry) -> None:
        entries.append(entry)
        document["rows"] = [e.row() for e in entries]
        out.write_text(json.dumps(document))

    none = _Entry(contender="none", setting="eager, no checkpointing", compiled=False,
                  workload=workload)
    _measure(none)
    done(none)
    assert none.peak_bytes is not None
    activation_bytes = profile(workload, fake=True).saved_activations_bytes
    document |= {"eager_peak_bytes": none.peak_bytes, "activation_bytes": activation_bytes,
                 "batch": spec.batch}
    hf = _hf_checkpointing(workload)
    _measure(hf)
    done(hf)
    compiled = []
    for budget in spec.budgets:
        compiled.append(_compiled(workload, budget, spec.backend))
        done(compiled[-1])

    half_bytes = none.peak_bytes - activation_bytes // 2
    document["half_bytes"] = half_bytes
    chain = chain_of(workload, cost_model="roofline")
    assert hf.peak_bytes is not None
    for entry in _eager_plans(workload, chain, {"50% activations": half_bytes,
                                                "HF checkpointing's peak": hf.peak_bytes}):
        _measure(entry)
        done(entry)
    budgets = {f"{c.setting}'s peak": c.peak_bytes for c in compiled if c.peak_bytes}
    planner = _CompiledPlanner(workload)
    for label, budget in {**budgets, "50% activations": half_bytes}.items():
        if spec.quick and label != "50% activations":
            # One inductor compile covers the path; each costs half a minute even so.
            planned, why = None, "quick mode plans the compiled step at 50% activations only"
        else:
            planned, why = planner.entry(budget, label)
        if planned is None:
            document["notes"].append(f"compiled plan at {label}: {why}")
            continue
        _measure(planned)
        done(planned)
    larger, why = _largest_batch(spec, none.peak_bytes)
    if larger is None:
        document["notes"].append(f"largest batch: {why}")
    else:
        _measure(larger)
        done(larger)

    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    times = interleaved_medians({str(i): e.step for i, e in enumerate(entries)},
                                repeats=spec.repeats, warmup=1)
    # A compiled contender that compiles again while timed is timed compiling: said, not hidden.
    document["compiled_while_timed"] = counters["stats"]["unique_graphs"] - graphs
    document["rows"] = [{**e.row(), "step_s": times[str(i)]} for i, e in enumerate(entries)]
    document["finished"] = True
    out.write_text(json.dumps(document))


if __name__ == "__main__":
    settings = json.loads(sys.argv[1])
    _run(_Spec(**{**settings, "budgets": tuple(settings["budgets"])}), Path(sys.argv[2]))
