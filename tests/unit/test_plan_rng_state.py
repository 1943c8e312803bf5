"""The generators' state that checkpoints around random stages keep (``Chain.rng_state_bytes``),
in the simulator and the dynamic programs alike: the optimal planner against exhaustive search
on random chains whose stages draw random numbers or not, and the simulator's moments counted
by hand."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from memprop.plan import Chain, Segment, Stage, min_feasible_bytes, simulate, solve
from memprop.plan.chain import rng_state_bytes_on
from tests.unit.test_plan_optimal import (
    _exhaustive,
    _random_chain,
    assert_optimal_equals_exhaustive,
)


def _drawing(rng: random.Random, chain: Chain) -> Chain:
    """``chain`` with random stages (some, all or none) and a state of a random size."""
    share = rng.choice((0.0, 0.5, 1.0))
    stages = tuple(dataclasses.replace(s, draws_random=rng.random() < share)
                   for s in chain.stages)
    return dataclasses.replace(chain, stages=stages, rng_state_bytes=rng.randint(1, 9))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 7))
def test_optimal_equals_exhaustive_search_with_random_states(seed: int, n: int) -> None:
    rng = random.Random(seed)
    chain = _drawing(rng, _random_chain(rng, n))
    least = min(p for p, _ in _exhaustive(chain))
    assert simulate(chain, min_feasible_bytes(chain)[1]).peak_bytes == least
    assert_optimal_equals_exhaustive(chain)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 12))
def test_rounded_slots_stay_safe_with_random_states(seed: int, n: int) -> None:
    """Slots coarser than a byte (``max_slots``) round the states up like every other size."""
    rng = random.Random(seed)
    chain = _drawing(rng, _random_chain(rng, n))
    floor = min_feasible_bytes(chain)[0]
    for budget in (floor, floor + 7, floor + 40):
        plan = solve(chain, budget, "optimal", max_slots=8)
        assert plan.peak_bytes <= budget


def _stage(name: str, *, draws: bool) -> Stage:
    return Stage(name=name, forward_cost=1.0, backward_cost=1.0, input_bytes=0, output_bytes=100,
                 saved_bytes=0, saves_input=False, saves_output=False, forward_peak_bytes=0,
                 backward_peak_bytes=0, draws_random=draws)


def test_a_checkpoint_around_a_random_stage_holds_two_states_at_its_rerun() -> None:
    """Two stages of 100-byte outputs that save nothing, the first checkpointed. Counted by
    hand: the caller holds ``x_2`` through the backward; stage 1's backward holds ``d_2`` and
    makes ``d_1`` (300 bytes), then the re-run of stage 0 makes ``x_1`` again beside ``x_2`` and
    ``d_1`` (300 bytes) and, when stage 0 draws random numbers, the state the checkpoint kept
    and fork_rng's copy of it: 300 + 2 * 7. A checkpoint of a stage that draws nothing keeps
    no state, whatever the size of one."""
    tree = Segment(start=0, stop=2, children=(Segment(start=0, stop=1, children=(0,)), 1))
    drawing = Chain(stages=(_stage("a", draws=True), _stage("b", draws=False)),
                    rng_state_bytes=7)
    assert simulate(drawing, tree).peak_bytes == 300 + 2 * 7
    quiet = Chain(stages=(_stage("a", draws=False), _stage("b", draws=True)),
                  rng_state_bytes=300)
    assert simulate(quiet, tree).peak_bytes == 300


def test_the_state_is_the_cpu_generators_on_the_cpu_and_nothing_elsewhere() -> None:
    import torch

    assert rng_state_bytes_on("cpu") == torch.get_rng_state().nbytes > 0
    assert rng_state_bytes_on("cuda:0") == 0 and rng_state_bytes_on("meta") == 0
