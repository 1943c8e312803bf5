"""``optimal`` against Griewank's binomial Revolve on uniform chains, where the two models agree.

# NOTE [ Revolve in memprop's memory model ]
Revolve reverses ``l`` steps with ``c`` checkpoint slots, ``x_0``'s included; a step is either
*advanced* (no tape, cost 1) or *taped* and reversed at once, every step taped exactly once, and a
schedule is priced by its advances, at least ``t(l, c)`` (:mod:`tests.revolve`).

The chain that realises it: ``l`` identical stages, forward cost 1, backward cost ``b``, output
``a`` bytes (so every state ``x_j`` and gradient ``d_j`` weighs ``a``; ``x_0`` is in
``fixed_bytes`` and weighs 0, like the slot Revolve reserves for it), a tape of ``T`` bytes besides
the input it saves, no transient beyond output and tape, no parameter gradients, the default loss.

- **Cost.** In a plan tree every stage is an ``int`` child of exactly one segment, so it runs with
  its tape exactly once (Revolve's taped step) and every other run is untaped (an advance). Hence
  ``sum(forward_runs) - l`` *is* the number of advances, and ``plan.compute - baseline_compute =
  advances * forward_cost``: the correspondence is ``t(l, c)`` itself, not ``t(l, c) - l``.
- **Shape.** While ``2 T`` exceeds the budget above ``fixed_bytes``, no plan holds two tapes
  (a kept stage's tape outlives the next stage's forward, whose moment adds another ``T``), so
  each segment is checkpointed sub-segments then one kept stage, run last and differentiated at
  once: Revolve's taped step. A segment's first checkpoint is Revolve's "advance ``s`` steps,
  store ``x_s``", the rest of its children are the reversal of ``s..l`` with one slot fewer, and
  the re-run of the checkpoint is the reversal of ``0..s`` with every slot: the same recursion.
- **Budget.** The worst moment is an advance (or the taped step's backward, which weighs the
  same) at the deepest nesting, during the backward: ``fixed_bytes`` + the step's forward moment
  (output + tape) + ``c - 1`` stored states (the slots but ``x_0``'s) + the working state the
  step reads + ``x_n`` (the caller holds the output through the backward) + the gradient handed to
  the re-run segment. So ``B(c) = fixed + (a + T) + c a + 2 a`` (:func:`revolve_budget` derives it
  from the chain's moments), and every budget in ``[B(c), B(c + 1))`` is worth ``c`` slots. The
  first forward holds neither ``x_n`` nor a gradient, but the checkpoints it stores are all still
  held at the last stage's backward, which has both, so it never binds.

Where the models part: above ``2 T`` a plan may keep two tapes at once, which rotor's persistent
schedules allow and Revolve has no word for, so ``optimal`` does strictly better there; with
parameter gradients the backward's memory shrinks as it goes, which Revolve's fixed slots ignore.
"""

from __future__ import annotations

from functools import cache

import pytest

from memprop.errors import BudgetInfeasibleError
from memprop.plan import Chain, Segment, Stage, min_feasible_bytes, simulate, solve
from memprop.plan.schedule import flat
from tests.revolve import beta, repetition_number, revolve_advances

FIXED = 7
"""Bytes under every moment (parameters, the input): only shift the budget."""


def _uniform_chain(steps: int, *, act: int, tape: int, backward_cost: float = 2.0) -> Chain:
    stages = tuple(
        Stage(name=f"step{i}", forward_cost=1.0, backward_cost=backward_cost, input_bytes=act,
              output_bytes=act, saved_bytes=tape, saves_input=True, saves_output=False,
              forward_peak_bytes=0, backward_peak_bytes=0)
        for i in range(steps)
    )
    return Chain(stages=stages, fixed_bytes=FIXED)


def revolve_budget(chain: Chain, slots: int) -> int:
    """``B(c)``: the least training peak that grants ``slots`` Revolve checkpoints (``x_0``'s
    included), from the chain's moments; see ``NOTE [ Revolve in memprop's memory model ]``."""
    n = len(chain)
    state = chain.act_bytes(1)  # every x_j but x_0, which fixed_bytes holds
    step = chain.forward_moment_bytes(n - 1)  # the step's output and tape, born as it runs
    stored = (slots - 1) * state  # the slots but x_0's
    working = state  # the state the step reads, in no slot
    output = chain.storage_bytes(chain.storage_of(n))  # x_n, held by the caller to the end
    gradient = chain.act_bytes(n)  # the d_j handed to the segment being re-run
    return chain.fixed_bytes + step + stored + working + output + gradient


@cache
def _classic(steps: int, slots: int) -> tuple[int, int]:
    """The classic recursion, by brute force over the first split: advance ``s`` steps, store
    ``x_s``, reverse ``s..l`` with one slot fewer, then ``0..s`` with all of them. A last step
    whose input is the working state needs no slot. Returns (advances, best ``s``; 0 for none)."""
    if steps == 1:
        return 0, 0
    if slots == 0:
        return 10**9, 0
    return min((s + _classic(steps - s, slots - 1)[0] + _classic(s, slots)[0], s)
               for s in range(1, steps))


def _revolve_tree(start: int, steps: int, slots: int) -> tuple[int | Segment, ...]:
    """The children that the classic recursion's schedule is, as a memprop plan."""
    if steps == 1:
        return (start,)
    s = _classic(steps, slots)[1]
    head = Segment(start=start, stop=start + s, children=_revolve_tree(start, s, slots))
    return (head, *_revolve_tree(start + s, steps - s, slots - 1))


def _advances(plan_runs: tuple[int, ...]) -> int:
    return sum(plan_runs) - len(plan_runs)


def _two_tapes(tree: Segment) -> bool:
    """Whether some segment keeps a stage that is not its last child (its tape then outlives
    another stage's forward)."""
    kept_early = any(isinstance(c, int) for c in tree.children[:-1])
    return kept_early or any(_two_tapes(c) for c in tree.children if isinstance(c, Segment))


# ---- the oracle ---------------------------------------------------------------------------------


def test_binomial_formula_equals_the_classic_recursion() -> None:
    for steps in range(1, 41):
        for slots in range(1, 9):
            assert revolve_advances(steps, slots) == _classic(steps, slots)[0], (steps, slots)


def test_binomial_formula_closed_forms() -> None:
    for steps in range(1, 30):
        assert revolve_advances(steps, 1) == steps * (steps - 1) // 2  # only x_0 stored
        for slots in range(max(1, steps - 1), steps + 3):
            assert revolve_advances(steps, slots) == steps - 1  # one sweep, every state stored
    for slots in range(1, 6):
        for r in range(1, 6):
            longest = beta(slots, r)
            assert repetition_number(longest, slots) == r
            assert repetition_number(longest + 1, slots) == r + 1
    assert beta(3, 2) == 10 and beta(2, -1) == 0
    with pytest.raises(ValueError):
        revolve_advances(0, 1)
    with pytest.raises(ValueError):
        revolve_advances(3, 0)


# ---- the planner against it ---------------------------------------------------------------------


@pytest.mark.parametrize(("act", "tape", "backward_cost"),
                         [(1, 100, 2.0), (4096, 4096 * 60, 1.0), (3, 3 * 40 + 1, 0.5)])
def test_optimal_equals_revolve_on_uniform_chains(act: int, tape: int,
                                                  backward_cost: float) -> None:
    for steps in range(1, 21):
        chain = _uniform_chain(steps, act=act, tape=tape, backward_cost=backward_cost)
        for slots in range(1, 6):
            budget = revolve_budget(chain, slots)
            assert budget - FIXED < 2 * tape  # one tape at a time: the models coincide
            plan = solve(chain, budget, "optimal")
            expected = revolve_advances(steps, slots)
            assert _advances(plan.forward_runs) == expected, (steps, slots)
            assert plan.compute - plan.baseline_compute == expected  # forward cost 1
            assert plan.peak_bytes <= budget
            if slots > 1:  # the budget is tight: a byte less is worth one slot less
                less = solve(chain, budget - 1, "optimal")
                assert _advances(less.forward_runs) == revolve_advances(steps, slots - 1)


def test_one_slot_is_the_least_feasible_budget() -> None:
    for steps in range(2, 15):
        chain = _uniform_chain(steps, act=1, tape=50)
        assert min_feasible_bytes(chain)[0] == revolve_budget(chain, 1)
        with pytest.raises(BudgetInfeasibleError):
            solve(chain, revolve_budget(chain, 1) - 1, "optimal")


def test_revolve_schedule_needs_exactly_its_budget() -> None:
    """The classic recursion's schedule, run by the simulator: Revolve's count, and a peak of
    ``B(c)`` exactly when it needs all ``c`` slots (fewer would cost more advances). This checks
    the budget derivation independently of the dynamic program."""
    for steps in range(1, 21):
        chain = _uniform_chain(steps, act=1, tape=100)
        for slots in range(1, 6):
            tree = Segment(start=0, stop=steps, children=_revolve_tree(0, steps, slots))
            sim = simulate(chain, tree)
            assert _advances(sim.forward_runs) == revolve_advances(steps, slots)
            assert not _two_tapes(tree)
            budget = revolve_budget(chain, slots)
            assert sim.peak_bytes <= budget
            if steps > 1 and (slots == 1 or revolve_advances(steps, slots)
                              < revolve_advances(steps, slots - 1)):
                assert sim.peak_bytes == budget, (steps, slots)


@pytest.mark.parametrize("steps", [2, 3, 5, 8, 12])
def test_agreement_holds_for_every_budget_below_two_tapes(steps: int) -> None:
    """Every budget from the least to ``fixed + 2 T`` is worth ``c`` slots, ``c`` counted from
    ``B(1)`` in states; above, ``optimal`` beats Revolve only by keeping two tapes at once."""
    act, tape = 1, 24
    chain = _uniform_chain(steps, act=act, tape=tape)
    first = revolve_budget(chain, 1)
    for budget in range(min_feasible_bytes(chain)[0], FIXED + 2 * tape + 1):
        slots = max(1, (budget - first) // act + 1)
        plan = solve(chain, budget, "optimal")
        assert _advances(plan.forward_runs) == revolve_advances(steps, slots), budget
        assert not _two_tapes(plan.tree)
    top = simulate(chain, flat(steps)).peak_bytes
    for budget in range(FIXED + 2 * tape + 1, top + 1):
        plan = solve(chain, budget, "optimal")
        slots = (budget - first) // act + 1
        if _advances(plan.forward_runs) < revolve_advances(steps, slots):
            assert _two_tapes(plan.tree), budget
            break
    else:
        pytest.fail("optimal never beat Revolve, even with every tape kept")
    assert solve(chain, top, "optimal").compute == simulate(chain, flat(steps)).compute


def test_optimal_equals_revolve_when_tapes_dwarf_activations() -> None:
    """A slot of ``ceil(avail / max_slots)`` bytes outweighs an activation here: every size rounds
    up and the budget down, so ``B(c)`` alone is worth fewer slots (l=8, c=4 gave 28 advances).
    The table's extra columns, each plan checked by the simulator, recover Revolve's count."""
    chain = _uniform_chain(8, act=1000, tape=1_000_003)
    assert _advances(solve(chain, revolve_budget(chain, 4), "optimal").forward_runs) == 10
    for steps in (5, 12):
        chain = _uniform_chain(steps, act=1000, tape=1_000_003)
        for slots in range(2, 6):
            budget = revolve_budget(chain, slots)
            assert budget - chain.fixed_bytes > 500 * chain.act_bytes(1)  # rounded, not exact
            plan = solve(chain, budget, "optimal")
            assert plan.peak_bytes <= budget
            assert _advances(plan.forward_runs) == revolve_advances(steps, slots), (steps, slots)
