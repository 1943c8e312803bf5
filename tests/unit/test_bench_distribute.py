"""The exercise report's bookkeeping: which answer a candidate stands for, and which candidate
stands for its family."""

from __future__ import annotations

from memprop.bench.distribute import _best_per_family, family
from memprop.distribute import Candidate, Distribution, Rank
from memprop.distribute.pipeline import PipelineShape
from memprop.plan.solvers import Plan


def _candidate(strategy: str, microbatches: int = 1, *, fits: bool = True, step: float = 1.0,
               peak: int = 100, plan: object = None, devices: int = 2) -> Candidate:
    shape = (PipelineShape(schedule="GPipe", ranks=devices, microbatches=microbatches,
                           bounds=(0, 1, 2)) if strategy == "pipeline" else None)
    return Candidate(strategy=strategy, devices=1 if strategy == "accumulate" else devices,
                     microbatches=microbatches, microbatch_size=8, fits=fits,
                     predicted_step_s=step, ranks=(Rank(rank=0, predicted_peak_bytes=peak),),
                     least_budget_bytes=peak, plan=plan, layout=shape)  # type: ignore[arg-type]


def test_family_names_the_answer() -> None:
    plan = object.__new__(Plan)
    assert family(_candidate("accumulate")) == "one device"
    assert family(_candidate("accumulate", plan=plan)) == "recompute"
    assert family(_candidate("accumulate", 4, plan=plan)) == "microbatches"
    assert family(_candidate("ddp")) == "DDP"
    assert family(_candidate("fsdp")) == "FSDP2"
    assert family(_candidate("pipeline", 2)) == "pipeline"


def test_a_family_is_its_fastest_fitting_candidate_or_its_least_peak() -> None:
    slow = _candidate("ddp", 1, step=2.0, peak=50)
    fast = _candidate("ddp", 2, step=1.0, peak=90)
    too_big = _candidate("ddp", 4, fits=False, step=0.5, peak=500)
    alone = _candidate("fsdp", 1, fits=False, step=1.0, peak=300)
    less = _candidate("fsdp", 2, fits=False, step=3.0, peak=200)
    result = Distribution(devices=2, budget_bytes=100, batch_size=16,
                          candidates=(slow, fast, too_big, alone, less), chosen=1,
                          communication="")
    best = {name: (c, chosen) for name, c, chosen in _best_per_family(result)}
    assert best["DDP"] == (fast, True)
    assert best["FSDP2"] == (less, False)
    by_memory = {name: c for name, c, _ in _best_per_family(result, least_memory=True)}
    assert by_memory["DDP"] is slow
