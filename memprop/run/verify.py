"""A plan checked before it runs: the planned step traced on fake tensors against the prediction.

The planner predicts a plan's peak from a model of the chain (``memprop.plan.chain``); the
ledger measures what the step does. Tracing the planned step, with the plan installed exactly as
the runtime installs it, on a fake mirror of the workload costs no memory and catches what the
model cannot see: a chain that the step does not run as planned (a plan that never runs, stages
called in another order), memory outside the chain that the model misses. The loop's first step
and its steady state are both traced (``memprop.trace.step.trace_training``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from memprop.blame import is_fake_tensor_limit
from memprop.errors import ModelError, PlanCheckError, PlanMismatchWarning
from memprop.plan.solvers import Plan
from memprop.run.install import installed
from memprop.run.measure import mismatch, not_run
from memprop.trace.fake import exact_sizes_only, fake_mode_of, new_fake_mode, to_fake_workload
from memprop.trace.step import trace_training
from memprop.units import format_bytes
from memprop.workload import Workload, restore_state, save_state

__all__ = ["traced_plan_peak", "traced_plan_peak_on", "verify_plan", "verify_plan_on"]


def traced_plan_peak(workload: Workload, plan: Plan) -> int:
    """The training peak of ``workload`` run under ``plan``, traced on fake tensors (the larger
    of the loop's first step and its steady state). Raises :class:`PlanCheckError` when the
    step does not run the plan."""
    return traced_plan_peak_on(workload, plan)[0]


def traced_plan_peak_on(workload: Workload, plan: Plan) -> tuple[int, str]:
    """:func:`traced_plan_peak`, and what it was traced on: ``"fake"``, or ``"real"`` for a real
    workload whose forward fake tensors cannot trace exactly (NOTE [ Sizes that depend on
    values ] in ``memprop.trace.fake``); the model is put back after a real trace."""
    mode = fake_mode_of(workload)
    if mode is not None:
        return _traced(workload, plan, mode), "fake"
    try:
        with exact_sizes_only():
            return _traced(to_fake_workload(workload, mode := new_fake_mode()), plan, mode), "fake"
    except ModelError as error:
        if not is_fake_tensor_limit(error):
            raise
    state = save_state(workload)
    try:
        return _traced(workload, plan, contextlib.nullcontext()), "real"
    finally:
        restore_state(workload, state)


def _traced(workload: Workload, plan: Plan, mode: Any) -> int:
    with mode, installed(workload.model, plan.stage_names, plan.tree, plan.selective,
                         plan.draws_random, head_chunks=plan.head_chunks) as calls:
        traced = trace_training(workload)
    if calls.expected and calls.count == 0:
        raise PlanCheckError(not_run(workload.model, plan))
    return max(traced.steady.ledger.peak()[0], traced.first_step_peak_bytes or 0)


def verify_plan(workload: Workload, plan: Plan) -> int:
    """Trace ``plan`` on ``workload`` (fake tensors) and hold it to its budget and prediction:
    :class:`PlanCheckError` above the budget, :class:`PlanMismatchWarning` when the traced peak
    strays from the prediction by more than the tolerance. Returns the traced peak."""
    return verify_plan_on(workload, plan)[0]


def verify_plan_on(workload: Workload, plan: Plan) -> tuple[int, str]:
    """:func:`verify_plan`, and what the step was traced on (:func:`traced_plan_peak_on`)."""
    traced, traced_on = traced_plan_peak_on(workload, plan)
    if traced > plan.budget_bytes:
        raise PlanCheckError(
            f"the planned step traces at {format_bytes(traced)}, over the budget of "
            f"{format_bytes(plan.budget_bytes)} (predicted {format_bytes(plan.peak_bytes)}): "
            "memprop's model of this step is wrong, a memprop bug; the plan was not used"
        )
    warning = mismatch(plan.peak_bytes, traced, "traced for the planned step")
    if warning is not None:
        warnings.warn(warning, PlanMismatchWarning, stacklevel=3)
    return traced, traced_on
