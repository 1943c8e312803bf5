"""``memprop run``: train under the plan and measure it against the unplanned step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from memprop.budget import resolve_budget
from memprop.errors import BudgetInfeasibleError, ModelError, UsageError
from memprop.report.json_report import write_json
from memprop.units import format_bytes
from memprop.workload import Workload
from memprop_cli.options import (
    WorkloadOptions,
    build_workload,
    console_for,
    output_path,
    with_workload_options,
    working,
)
from memprop_cli.plan import (
    BudgetOption,
    ChunkHead,
    Compile,
    CostModel,
    Strategy,
    check_compiled_options,
    check_plan_options,
)


@with_workload_options()
def run_command(
    options: WorkloadOptions,
    budget: BudgetOption = None,
    steps: Annotated[int, typer.Option(help="Timed training steps, each way.")] = 5,
    strategy: Strategy = "optimal",
    cost_model: CostModel = "roofline",
    chunk_head: ChunkHead = False,
    compile: Compile = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="PATH", parser=output_path,
        help="Write the run document; - is standard output.")] = None,
) -> None:
    """Train under the plan and measure it against the unplanned step.

    The first three steps are measured one by one (the loop's first step, then its steady
    state), then --steps more are timed: measured peak against predicted and budget, step time
    against the unplanned step, and whether the gradients match. When the unplanned step does
    not fit the device, only the planned steps run. With --compile, the steps run
    torch.compile'd under the compiled plan (memprop plan --compile), against eager unplanned
    steps."""
    import memprop
    from memprop.blame import is_fake_tensor_limit
    from memprop.estimate.preflight import refuse_unless_it_fits, shortfall
    from memprop.plan.costs import on_fake_tensors
    from memprop.report.terminal_plan import render_run
    from memprop.run.measure import check_run, run_plan
    from memprop.run.scratch import measure_scratch, plan_around, scratch_line
    from memprop.run.verify import verify_plan
    from memprop.trace.fake import device_of

    console = console_for({"--json": json_path})
    if steps < 1:
        raise UsageError(f"--steps {steps}: give at least 1")
    check_plan_options(strategy, cost_model, fake=False)
    cap = resolve_budget(budget, options.device)
    if compile:
        _run_compiled(options, cap, steps=steps, cost_model=cost_model, chunk_head=chunk_head,
                      json_path=json_path, console=console)
        return
    plan, baseline = None, True
    with working("planning on fake tensors"):
        try:
            fake = build_workload(options, fake=True, fallback=False, say=console.print)
            device = str(device_of(fake))
            plan = memprop.plan(fake, budget=cap.bytes, strategy=strategy,
                                cost_model=on_fake_tensors(cost_model), chunk_head=chunk_head)
            traced = verify_plan(fake, plan)
        except ModelError as error:
            if not is_fake_tensor_limit(error):
                raise
        except BudgetInfeasibleError as error:
            # The least budget said must be one that runs: the kernels' scratch counted too
            # (NOTE [ Scratch the ledger cannot see ]), measured under the least plan.
            least = memprop.plan(fake, budget=error.min_feasible_bytes, strategy=strategy,
                                 cost_model=on_fake_tensors(cost_model), chunk_head=chunk_head)
            if shortfall(least.peak_bytes, device) is not None:
                raise
            scratch = measure_scratch(build_workload(options, fake=False), least)
            plan_around(lambda cap_bytes: memprop.plan(
                fake, budget=cap_bytes, strategy=strategy,
                cost_model=on_fake_tensors(cost_model), chunk_head=chunk_head),
                cap.bytes, scratch)
            raise  # the scratch made no difference
    if plan is not None:
        refuse_unless_it_fits(traced, device, "the planned step",
                              "lower --budget to what the device has")
        reason = shortfall(plan.baseline_peak_bytes, device)
        if reason is not None:
            baseline = False
            console.print(f"the unplanned step {reason}: only the planned steps run")
        if cost_model == "measured" and not baseline:
            raise UsageError("--cost-model measured times real unplanned steps, which do not "
                             "fit this device: use --cost-model roofline")
    with working("measuring the kernels' scratch on a real step"):
        workload = build_workload(options, fake=False)
        unfinite = _not_finite(workload)
        # NOTE [ Scratch the ledger cannot see ] in memprop.run.scratch: measured under the
        # plan made on fake tensors where there is one (it fits the device), and the plan made
        # again for the budget less it.
        scratch = measure_scratch(workload, None if cost_model == "measured" else plan)
    with working("running the planned steps"):
        if plan is None or cost_model == "measured":
            plan = plan_around(lambda cap_bytes: memprop.plan(
                workload, budget=cap_bytes, strategy=strategy, cost_model=cost_model,
                chunk_head=chunk_head), cap.bytes, scratch)
        elif scratch.bytes:
            plan = plan_around(lambda cap_bytes: memprop.plan(
                fake, budget=cap_bytes, strategy=strategy,
                cost_model=on_fake_tensors(cost_model), chunk_head=chunk_head),
                cap.bytes, scratch)
            verify_plan(fake, plan)
        result = run_plan(workload, plan, steps=steps, baseline=baseline, scratch=scratch)
    if cap.source != "given":
        console.print(f"budget: {cap.source}")
    if scratch.bytes:
        console.print(scratch_line(scratch, cap.bytes))
    render_run(result, console, workload)
    if options.device.startswith("cuda") and result.baseline_peak_bytes is not None:
        from memprop.devices import get_device
        from memprop.report.terminal_gpu import render_reconciliation

        # The allocator's peaks were last reset for the unplanned run, which ran last.
        layers = get_device(options.device).layers(result.baseline_peak_bytes)  # type: ignore[attr-defined]
        console.print("the unplanned step on the device:")
        render_reconciliation(layers, console)
    if json_path is not None:
        console.print(f"wrote {write_json(json_path, result.to_dict())}")
    if unfinite is not None and result.gradients_match is False:
        console.print(f"warning: the gradients cannot match: {unfinite}, so the loss and the "
                      "gradients are NaN, and NaN equals nothing, itself included; give finite "
                      "inputs to check them", style="yellow")
    failure, mismatch = check_run(result)
    if mismatch is not None:
        console.print(f"warning: {mismatch}", style="yellow")
    if failure is not None:
        raise failure
    console.print(f"every measured step within the budget of {format_bytes(plan.budget_bytes)}")


def _run_compiled(options: WorkloadOptions, cap: Any, *, steps: int, cost_model: str,
                  chunk_head: bool, json_path: Path | None, console: Any) -> None:
    """``memprop run --compile``: the compiled plan, made on fake tensors, run for real and
    measured by the allocator against the budget."""
    from memprop.errors import BudgetExceededError
    from memprop.plan.compiled import plan_compiled
    from memprop.report.terminal_compiled import render_compiled_run
    from memprop.run.compiled import run_compiled

    check_compiled_options(cost_model)
    with working("planning the compiled step on fake tensors"):
        fake = build_workload(options, fake=True, say=console.print)
        plan = plan_compiled(fake, cap.bytes, chunk_head=chunk_head, cost_model=cost_model)
    with working("running the compiled steps"):
        result = run_compiled(build_workload(options, fake=False), plan, steps=steps)
    if cap.source != "given":
        console.print(f"budget: {cap.source}")
    render_compiled_run(result, console, fake)
    if json_path is not None:
        console.print(f"wrote {write_json(json_path, result.to_dict())}")
    if not result.gradients_match:
        console.print("warning: the compiled step's gradients differ from the eager step's by "
                      f"more than {result.gradients_rtol:g} of their largest magnitude",
                      style="yellow")
    if result.allocator_peak_bytes > plan.budget_bytes:
        # The user's outcome (exit 3), as an eager plan's: inductor's kernels allocate inside
        # one op too, which the op-by-op bound does not see.
        over = result.allocator_peak_bytes - plan.budget_bytes
        raise BudgetExceededError(
            f"the compiled steps peaked at {format_bytes(result.allocator_peak_bytes)} by the "
            f"allocator's count, {format_bytes(over)} over the budget of "
            f"{format_bytes(plan.budget_bytes)}, though held to "
            f"{format_bytes(plan.bound_peak_bytes)} op by op: memory the compiled kernels "
            "allocate inside themselves, which no traced graph shows; the budget does not hold "
            "for this step: raise it by that much")
    console.print(f"every measured step within the budget of {format_bytes(plan.budget_bytes)}")


def _not_finite(workload: Workload) -> str | None:
    """What holds NaN or infinity among the workload's inputs and targets, in words, or None."""
    import torch

    named = [(f"input {i}", t) for i, t in enumerate(workload.inputs)]
    named += [(f"input {k!r}", t) for k, t in workload.keywords.items()]
    if workload.targets is not None:
        named.append(("the targets", workload.targets))
    bad = [name for name, tensor in named
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    return None if not bad else f"{', '.join(bad)} hold{'s' if len(bad) == 1 else ''} NaN or inf"
