"""The optimal planner against exhaustive search over every plan tree, on random chains."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memprop.errors import BudgetInfeasibleError
from memprop.plan import (
    Chain,
    Segment,
    Stage,
    _dp,
    min_feasible_bytes,
    simulate,
    solve,
    solvers,
    uniform_tree,
)
from memprop.plan.schedule import flat
from memprop.plan.selective import Option


def _plans(atoms: list[tuple[int, int]], a: int, b: int, chain: Chain | None = None,
           *, top: bool = False) -> Iterator[tuple[int | Segment, ...]]:
    """Every child sequence for atoms [a, b) whose last atom is kept: the search space. An atom
    is a run of stages that a plan never splits (an aliasing stage glued to the one before); a
    pinned stage (a model's prefix or suffix) is never inside a checkpointed segment. At the
    top level, a checkpoint of one stage may run any of its selective options."""
    kept = tuple(range(*atoms[a]))
    if b - a == 1:
        yield kept
        return
    for rest in _plans(atoms, a + 1, b, chain, top=top):
        yield (*kept, *rest)
    for s in range(a + 1, b):
        if chain is not None and not chain.checkpointable(atoms[a][0], atoms[s - 1][1]):
            continue
        start, stop = atoms[a][0], atoms[s - 1][1]
        single = top and chain is not None and stop - start == 1
        choices = range(len(chain.stages[start].options) + 1) if single else (0,)  # type: ignore[union-attr]
        for inner in _plans(atoms, a, s, chain):
            for rest in _plans(atoms, s, b, chain, top=top):
                for option in choices:
                    segment = Segment(start=start, stop=stop, children=inner, option=option)
                    yield (segment, *rest)


def _random_chain(rng: random.Random, n: int, *, locals_: bool = False) -> Chain:
    """Heterogeneous stages with every feature of the model: tapes that hold the output,
    in-place or view stages, parameter gradients, a pinned prefix and suffix, the loss's and
    the optimizer's moments, selective options (kept bytes, saved cost, the re-run's
    transient); with ``locals_``, the forward's locals too (which the DP counts at every forward
    moment, re-runs included: safe, not exact)."""
    stages: list[Stage] = []
    pinned = {0} if n > 1 and rng.random() < 0.3 else set()
    if n > 2 and rng.random() < 0.3:
        pinned.add(n - 1)
    for i in range(n):
        aliases = i > 0 and rng.random() < 0.2
        out = stages[-1].output_bytes if aliases else rng.randint(1, 9)
        tape, so = rng.randint(0, 9), rng.random() < 0.4
        forward_cost, forward_peak = rng.randint(1, 9), rng.randint(0, 25)
        stages.append(Stage(
            name=f"s{i}", forward_cost=float(forward_cost),
            backward_cost=float(rng.randint(1, 9)), input_bytes=0, output_bytes=out,
            saved_bytes=tape + (out if so else 0), saves_input=rng.random() < 0.6,
            saves_output=so, forward_peak_bytes=forward_peak,
            backward_peak_bytes=rng.randint(0, 25), gradient_bytes=rng.choice((0, 0, 1, 4, 9)),
            aliases_input=aliases, pinned=i in pinned,
            forward_held_bytes=rng.choice((0, 0, 0, rng.randint(1, 6))) if locals_ else 0,
            options=tuple(Option(cache_bytes=rng.randint(1, max(1, tape)),
                                 saved_cost=float(rng.randint(1, forward_cost)),
                                 rerun_peak_bytes=forward_peak + rng.randint(0, 6), keep=())
                          for _ in range(rng.choice((0, 0, 1, 2, 3)))),
        ))
    return Chain(stages=tuple(stages), fixed_bytes=rng.randint(0, 5),
                 loss_peak_bytes=rng.choice((None, rng.randint(0, 30))),
                 loss_residual_bytes=rng.choice((None, rng.randint(0, 12))),
                 optimizer_peak_bytes=rng.choice((0, 0, rng.randint(0, 60))))


def _exhaustive(chain: Chain) -> list[tuple[int, float]]:
    n, atoms = len(chain), chain.atoms()
    sims = [simulate(chain, Segment(start=0, stop=n, children=c))
            for c in _plans(atoms, 0, len(atoms), chain, top=True)]
    return [(s.peak_bytes, s.compute) for s in sims]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 7))
def test_optimal_equals_exhaustive_search(seed: int, n: int) -> None:
    assert_optimal_equals_exhaustive(_random_chain(random.Random(seed), n))


def assert_optimal_equals_exhaustive(chain: Chain) -> None:
    """At every budget from the least feasible peak up: the DP's table, its tree simulated and
    ``solve`` cost exactly what exhaustive search finds, within the budget."""
    n = len(chain.stages)
    front = _exhaustive(chain)
    least = min(p for p, _ in front)
    assert min_feasible_bytes(chain)[0] == least
    units = _dp.make_units(chain, chain.atoms())
    for budget in range(least, max(p for p, _ in front) + 2, 2):
        best = min(c for p, c in front if p <= budget)
        table = _dp.CostTable(units, budget - chain.fixed_bytes)  # 1-byte slots: exact
        assert table.best() == best
        sim = simulate(chain, table.tree(n))
        assert sim.compute == best and sim.peak_bytes <= budget
        plan = solve(chain, budget, "optimal")
        assert plan.compute == best and plan.peak_bytes <= budget


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 7))
def test_with_the_forwards_locals_optimal_is_safe_and_never_beats_exhaustive(seed: int,
                                                                              n: int) -> None:
    chain = _random_chain(random.Random(seed), n, locals_=True)
    front = _exhaustive(chain)
    least = min(p for p, _ in front)
    floor = min_feasible_bytes(chain)[0]
    assert floor >= least
    for budget in range(floor, max(p for p, _ in front) + 2, 3):
        plan = solve(chain, budget, "optimal")
        assert plan.peak_bytes <= budget
        assert plan.compute >= min(c for p, c in front if p <= budget)


@pytest.mark.parametrize("n", [8, 9, 10])
def test_optimal_equals_exhaustive_search_longer(n: int) -> None:
    # Up to 10 stages: tens of thousands of trees each, every one simulated.
    chain = _random_chain(random.Random(n), n)
    front = _exhaustive(chain)
    least = min(p for p, _ in front)
    for budget in range(least, max(p for p, _ in front) + 1, 7):
        best = min(c for p, c in front if p <= budget)
        assert solve(chain, budget, "optimal").compute == best


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12))
def test_optimal_never_worse_than_uniform_and_monotone(seed: int, n: int) -> None:
    chain = _random_chain(random.Random(seed), n)
    least = min_feasible_bytes(chain)[0]
    top = simulate(chain, flat(n)).peak_bytes
    previous, lowest = float("inf"), 0
    for budget in range(least, top + 1):
        plan = solve(chain, budget, "optimal")
        uniform = solve(chain, budget, "uniform", strict=False)
        if uniform.feasible:
            assert plan.compute <= uniform.compute
        assert plan.compute <= previous  # more memory never costs more compute
        # and a smaller budget never gives a higher peak (torch's activation_memory_budget
        # does not promise this: pytorch#197838)
        assert plan.peak_bytes >= lowest
        previous, lowest = plan.compute, plan.peak_bytes
    assert solve(chain, top, "optimal").compute == simulate(chain, flat(n)).compute


def test_min_feasible_fits_and_one_byte_less_raises() -> None:
    chain = _random_chain(random.Random(7), 12)
    least = min_feasible_bytes(chain)[0]
    assert solve(chain, least, "optimal").peak_bytes <= least
    with pytest.raises(BudgetInfeasibleError) as info:
        solve(chain, least - 1, "optimal")
    assert info.value.min_feasible_bytes == least
    assert info.value.budget_bytes == least - 1
    assert "12-stage chain" in str(info.value) and "raise the budget to at least" in str(info.value)


def test_infeasible_message_in_house_style() -> None:
    mib = 1024**2
    stage = Stage(name="s", forward_cost=1.0, backward_cost=1.0, input_bytes=mib,
                  output_bytes=64 * mib, saved_bytes=0, saves_input=True, saves_output=False,
                  forward_peak_bytes=64 * mib, backward_peak_bytes=64 * mib)
    chain = Chain(stages=(stage,) * 12, fixed_bytes=256 * mib)
    least = min_feasible_bytes(chain)[0]
    with pytest.raises(BudgetInfeasibleError) as info:
        solve(chain, 256 * mib, "optimal")
    assert str(info.value).startswith("budget 256 MiB is below the smallest feasible peak, ")
    assert info.value.min_feasible_bytes == least
    with pytest.raises(BudgetInfeasibleError):
        solve(chain, chain.fixed_bytes - 1, "optimal")


def test_grouped_plans_fit_and_never_beat_the_exact_ones() -> None:
    rng = random.Random(3)
    for _ in range(5):
        chain = _random_chain(rng, 24)
        least = min_feasible_bytes(chain)[0]
        top = simulate(chain, flat(24)).peak_bytes
        for budget in (least, (least + top) // 2, top):
            exact = solve(chain, budget, "optimal", max_slots=10**6)
            grouped = solve(chain, budget, "optimal", max_slots=10**6, max_units=6)
            assert grouped.peak_bytes <= budget
            assert exact.compute <= grouped.compute


_MIB = 1024**2
_ULPS = 1e-12
"""Relative slack for costs in seconds: equal plans summed in another order differ by ulps."""


def _realistic_chain(rng: random.Random, n: int) -> Chain:
    """Sizes as a traced model gives them: MiB-scale, multiples of 4 bytes and no larger common
    factor, so that the cost table rounds to slots instead of counting bytes exactly."""
    def size(top: int) -> int:
        return rng.randint(1, top * _MIB // 4) * 4

    stages: list[Stage] = []
    for i in range(n):
        aliases = i > 0 and rng.random() < 0.15
        out = stages[-1].output_bytes if aliases else size(16)
        tape, so = size(24) if rng.random() < 0.8 else 0, rng.random() < 0.4
        stages.append(Stage(
            name=f"s{i}", forward_cost=rng.uniform(1e-3, 1e-2),
            backward_cost=rng.uniform(2e-3, 2e-2), input_bytes=0, output_bytes=out,
            saved_bytes=tape + (out if so else 0), saves_input=rng.random() < 0.7,
            saves_output=so, forward_peak_bytes=size(40), backward_peak_bytes=size(40),
            gradient_bytes=rng.choice((0, 0, size(8))), aliases_input=aliases,
        ))
    return Chain(stages=tuple(stages), fixed_bytes=size(512),
                 loss_peak_bytes=rng.choice((None, size(32))),
                 loss_residual_bytes=rng.choice((None, size(8))))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 14))
def test_optimal_never_worse_than_uniform_at_its_exact_peak(seed: int, n: int) -> None:
    """The budget's boundary: at exactly checkpoint_sequential's peak, for every segment count,
    optimal costs no more (rounding to slots once lost such plans)."""
    chain = _realistic_chain(random.Random(seed), n)
    atoms = chain.atoms()
    for k in range(1, len(atoms) + 1):
        uniform = simulate(chain, uniform_tree(n, k, atoms))
        plan = solve(chain, uniform.peak_bytes, "optimal")
        assert plan.peak_bytes <= uniform.peak_bytes
        assert plan.compute <= uniform.compute * (1 + _ULPS), k  # sums in another order


def test_cost_table_alone_finds_the_boundary_plans() -> None:
    """The same property without the uniform plans as a net: the cost table's extra columns,
    each plan checked by the simulator, find a plan at least as cheap (``solve`` then adds
    checkpoint_sequential's plans as a last net)."""
    rng = random.Random(5)
    for _ in range(12):
        n = rng.randint(2, 30)
        chain = _realistic_chain(rng, n)
        atoms = chain.atoms()
        units = _dp.make_units(chain, atoms)
        floor_tree = min_feasible_bytes(chain)[1]
        for k in range(1, len(atoms) + 1):
            uniform = simulate(chain, uniform_tree(n, k, atoms))
            avail = uniform.peak_bytes - chain.fixed_bytes
            assert solvers._slot_size(units, avail, solvers.DEFAULT_MAX_SLOTS)[2] > 0  # rounded
            tree = solvers._optimal_table(chain, uniform.peak_bytes, units,
                                          solvers.DEFAULT_MAX_SLOTS)
            sims = [simulate(chain, t) for t in (floor_tree, tree) if t is not None]
            assert all(s.peak_bytes <= uniform.peak_bytes for s in sims)
            assert min(s.compute for s in sims) <= uniform.compute * (1 + _ULPS), (n, k)


def test_selective_options_are_chosen_where_they_pay() -> None:
    # The search above includes options; this checks that it is not vacuous: on random chains,
    # some budgets are met cheapest by a top-level checkpoint that keeps some op outputs.
    chosen = 0
    for seed in range(30):
        chain = _random_chain(random.Random(seed), 5)
        front = _exhaustive(chain)
        for budget in range(min(p for p, _ in front), max(p for p, _ in front) + 1, 3):
            plan = solve(chain, budget, "optimal")
            chosen += any(isinstance(c, Segment) and c.option for c in plan.tree.children)
    assert chosen >= 10
