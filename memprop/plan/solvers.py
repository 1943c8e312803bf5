"""The strategies, the Plan they produce, and the one entry point, :func:`solve`.

- ``none``: every stage kept, no recomputation.
- ``uniform``: what ``torch.utils.checkpoint.checkpoint_sequential(segments=k)`` runs: ``k - 1``
  checkpointed segments of ``n // k`` stages, then the rest run normally; the ``k`` that fits
  with the least compute (ties: the lower peak).
- ``optimal``: the dynamic program of :mod:`memprop.plan._dp`: least compute under the budget
  over every persistent schedule (a stage may be recomputed more than once).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from memprop.errors import BudgetInfeasibleError, UsageError
from memprop.plan import _dp
from memprop.plan.chain import Chain
from memprop.plan.schedule import Segment, flat, kept_at_top, schedule_ops, simulate
from memprop.plan.selective import Option
from memprop.search import last_true
from memprop.units import format_bytes

__all__ = ["Plan", "check_strategy", "min_feasible_bytes", "solve", "uniform_tree"]

Strategy = Literal["optimal", "uniform", "none"]
STRATEGIES: tuple[str, ...] = ("optimal", "uniform", "none")

DEFAULT_MAX_SLOTS = 500
"""Memory-axis resolution of the cost table (rotor's default): exact when sizes share a large
gcd, else a safe rounding (see ``NOTE [ Slots and why rounding is safe ]``)."""
DEFAULT_MAX_UNITS = 200
"""The cost table is exact over chains of up to this many atoms (every stage its own unit);
longer chains are planned on this many groups of consecutive stages (kept or checkpointed
together), which restricts the search, never its safety, and the plan's note says so. The
table's time is cubic in the units (this 2-core VM, ``memprop bench --only planner``'s
synthetic chains: 0.3 s at 100 stages, 3 s at 200, 14 s at 300), so 200 keeps a plan of 200
blocks exact within a few seconds: grouping 200 blocks into 100 units cost 16.7% extra compute
where the exact plan costs 14.9%."""
EXACT_MAX_UNITS = 512
"""The least peak is exact over chains of up to this many atoms; a longer chain's is the least
over plans that checkpoint groups of consecutive atoms (a peak some plan attains, at most a few
stages' tapes above the exact one). The exact program takes time cubic in the atoms (3 s at
1,000 stages here, 25 s at 2,000): NOTE [ Planning time linear in depth ]."""
UNIFORM_ALL_SEGMENTS = 16
"""``uniform`` tries every segment count up to this, then counts spaced by ``UNIFORM_SPACING``
(NOTE [ Planning time linear in depth ])."""
UNIFORM_SPACING = 1.25

# NOTE [ Planning time linear in depth ]
# Simulating a plan costs its schedule's length: every forward run of every stage. A chain of
# n stages therefore gets a bounded number of simulations of plans with O(n) runs each: the
# least-peak plan (nested up to n deep, O(n^2) runs) is priced by counting its forward runs
# (:func:`compute_of`), not simulated, unless it is the plan chosen; ``uniform`` simulates
# O(log n) segment counts, not all n; the least peak's exact program runs on at most
# ``EXACT_MAX_UNITS`` units, the cost table on at most ``DEFAULT_MAX_UNITS`` (both cubic in
# their units: a constant beyond them). The dynamic programs' units are priced by folding each
# unit's own schedule, O(n) runs in all. Tracing and pricing are linear too
# (``memprop.trace.stages``), so ``plan --fake`` grows with depth as ``profile`` does.


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What to keep, what to recompute, and what it is predicted to cost."""

    budget_bytes: int
    """The cap on the training peak that was asked for."""
    strategy: str
    """``optimal``, ``uniform`` or ``none``."""
    cost_model: str
    """How recomputation was priced: ``roofline``, ``flops`` or ``measured``
    (``memprop.plan.costs``)."""
    cost_note: str
    """The same in words, with the machine's rates for ``roofline``."""
    feasible: bool
    """Whether the predicted peak is within the budget."""
    min_feasible_bytes: int
    """The least budget for which this strategy finds a plan."""
    tree: Segment
    """The plan as nested checkpoints (see :mod:`memprop.plan.schedule`)."""
    stage_names: tuple[str, ...]
    """The chain's stage names, in order."""
    forward_runs: tuple[int, ...]
    """How many times each stage's forward runs."""
    peak_bytes: int
    """Predicted training peak."""
    compute: float
    """Predicted compute of the step."""
    baseline_peak_bytes: int
    """The unplanned step's peak."""
    baseline_compute: float
    """The unplanned step's compute."""
    selective: dict[int, Option] = field(default_factory=dict)
    """The stages checkpointed under a selective option (``Segment.option``), by index: the op
    outputs each keeps from its first run to its re-run."""
    draws_random: tuple[bool, ...] = ()
    """Per stage, whether its forward draws random numbers (``Stage.draws_random``): a
    checkpoint keeps the generators' state only around such stages; empty when unknown (every
    checkpoint keeps it)."""
    head_chunks: int = 0
    """In how many chunks of tokens the step computes its head and loss, each recomputed in the
    backward (``memprop.trace.head``); 0: the model's own head."""

    @property
    def compute_overhead(self) -> float:
        """Extra compute over the unplanned step, as a fraction (0.25 is 25% more)."""
        if self.baseline_compute <= 0:
            return 0.0
        return (self.compute - self.baseline_compute) / self.baseline_compute

    @property
    def schedule(self) -> list[dict[str, Any]]:
        return schedule_ops(self.tree)

    def stages(self) -> list[dict[str, Any]]:
        """One row per stage: its tape ``kept``, ``dropped``, or ``selective`` (dropped but for
        some op outputs: ``keeps``, as ``op#occurrence``, holding ``keeps_bytes``); under the
        head option, the suffix's row says in how many chunks (``head_chunks``)."""
        kept = kept_at_top(self.tree)
        rows = []
        for i, name in enumerate(self.stage_names):
            row: dict[str, Any] = {"index": i, "name": name,
                                   "tape": "kept" if i in kept else "dropped",
                                   "recomputes": self.forward_runs[i] - 1}
            if self.head_chunks and i == len(self.stage_names) - 1:
                row["head_chunks"] = self.head_chunks  # the suffix's head and loss, chunked
            option = self.selective.get(i)
            if option is not None:
                row.update(tape="selective", keeps_bytes=option.cache_bytes,
                           keeps=[f"{op}#{occurrence}" for op, occurrence in option.keep])
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "budget_bytes": self.budget_bytes,
            "strategy": self.strategy,
            "cost_model": self.cost_model,
            "cost_note": self.cost_note,
            "feasible": self.feasible,
            "min_feasible_bytes": self.min_feasible_bytes,
            "stages": self.stages(),
            "schedule": self.schedule,
            "tree": self.tree.to_dict(),
            "predicted": {"peak_bytes": self.peak_bytes,
                          "compute_overhead": self.compute_overhead,
                          "compute": self.compute},
            "baseline": {"peak_bytes": self.baseline_peak_bytes,
                         "compute": self.baseline_compute},
            "head_chunks": self.head_chunks,
        }


def uniform_tree(n: int, segments: int, atoms: list[tuple[int, int]] | None = None) -> Segment:
    """``checkpoint_sequential(segments=segments)`` on ``n`` stages, as a tree. With ``atoms``
    (:meth:`Chain.checkpoint_atoms`) the split counts atoms instead of stages, so that no
    checkpoint starts with an in-place op or a view, and stages outside the atoms (a pinned
    prefix before them) stay kept."""
    bounds = atoms if atoms is not None else [(i, i + 1) for i in range(n)]
    count = len(bounds)
    if not 1 <= segments <= count:
        raise UsageError(f"segments={segments} for {count} stages: give 1 <= segments <= {count}")
    size = count // segments
    children: list[int | Segment] = list(range(bounds[0][0]))
    children += [
        Segment(start=bounds[s][0], stop=bounds[s + size - 1][1],
                children=tuple(range(bounds[s][0], bounds[s + size - 1][1])))
        for s in range(0, size * (segments - 1), size)
    ]
    children.extend(range(bounds[size * (segments - 1)][0], n))
    return Segment(start=0, stop=n, children=tuple(children))


def _groups(atoms: list[tuple[int, int]], max_units: int) -> list[tuple[int, int]]:
    """At most ``max_units`` runs of consecutive atoms, as even in atom count as can be."""
    n = len(atoms)
    units = min(n, max_units)
    cuts = [round(i * n / units) for i in range(units + 1)]
    return [(atoms[cuts[i]][0], atoms[cuts[i + 1] - 1][1]) for i in range(units)]


def min_feasible_bytes(chain: Chain) -> tuple[int, Segment]:
    """The least training peak of any plan (exact up to ``EXACT_MAX_UNITS`` atoms), and a plan
    that attains it; with the head option (``Chain.heads``), the least of the chains' (the
    tree is the same stages' either way; ``solve`` says whether it takes the option)."""
    own = _min_feasible(chain, _floor_units(chain, chain.atoms()))
    return min((own, *(min_feasible_bytes(head) for head in chain.heads)),
               key=lambda found: found[0])


def _floor_units(chain: Chain, atoms: list[tuple[int, int]]) -> _dp.Units:
    """The units the least peak is sought over (NOTE [ Planning time linear in depth ])."""
    groups = _groups(atoms, EXACT_MAX_UNITS)
    return _dp.make_units(chain, atoms if groups == atoms else groups)


def compute_of(chain: Chain, tree: Segment) -> float:
    """What :func:`simulate` finds for ``tree``'s compute, counted in time linear in the chain
    and the tree's segments: a stage runs once, plus once for each checkpointed segment around
    it (its re-run when backward reaches it), less what a selective option keeps."""
    n = len(chain)
    extra = [0] * (n + 1)
    saved = 0.0
    pending = [tree]
    while pending:
        segment = pending.pop()
        for child in segment.children:
            if isinstance(child, Segment):
                extra[child.start] += 1
                extra[child.stop] -= 1
                option = chain.option_of(child)
                saved += 0.0 if option is None else option.saved_cost
                pending.append(child)
    compute, runs = 0.0, 0
    for i, stage in enumerate(chain.stages):
        runs += extra[i]
        compute += (1 + runs) * stage.forward_cost + stage.backward_cost
    return compute - saved


def _min_feasible(chain: Chain, units: _dp.Units) -> tuple[int, Segment]:
    peak, tree, _ = _dp.min_peak(units)
    return max(chain.fixed_bytes + peak, chain.optimizer_peak_bytes), tree


def grouping_note(chain: Chain, max_units: int = DEFAULT_MAX_UNITS) -> str:
    """What the plan's note says when ``optimal`` plans ``chain`` on groups of stages rather
    than on every stage (its atoms outnumber ``max_units``, or ``EXACT_MAX_UNITS`` for the
    least peak); empty when it is exact."""
    atoms = len(chain.atoms())
    notes = []
    if atoms > max_units:
        notes.append(f"its {len(chain)} stages planned as {max_units} groups of consecutive "
                     f"stages (the exact program runs to {max_units}: its time grows as the "
                     f"cube of the stages)")
    if atoms > EXACT_MAX_UNITS:
        notes.append(f"the least feasible peak sought over {EXACT_MAX_UNITS} groups")
    return "; ".join(notes)


def _optimal(chain: Chain, budget_bytes: int, max_slots: int, max_units: int
             ) -> tuple[Segment, int]:
    atoms = chain.atoms()
    floor_bytes, floor_tree = _min_feasible(chain, _floor_units(chain, atoms))
    if budget_bytes < floor_bytes:
        return floor_tree, floor_bytes
    groups = _groups(atoms, max_units)
    units = _dp.make_units(chain, groups)
    best, bar = floor_tree, compute_of(chain, floor_tree)
    table_tree = _optimal_table(chain, budget_bytes, units, max_slots)
    if table_tree is not None:
        compute = simulate(chain, table_tree).compute
        if compute < bar:
            best, bar = table_tree, compute
    # Rounding or grouping can only lose: the exact least-peak plan stands in when they do, and
    # checkpoint_sequential's plans are a last net.
    return _uniform_net(chain, budget_bytes, best, bar), floor_bytes


def _slot_size(units: _dp.Units, avail: int, max_slots: int) -> tuple[int, int, int]:
    """(slot size ``u``, the budget in slots rounded down, extra columns); see ``NOTE [ Slots
    and why rounding is safe ]``."""
    exact = max(units.gcd(), 1)
    spare = (4 if units.keeps_states else 2) * units.n + 2  # most rounded terms of a constraint
    if avail // exact <= max_slots + spare:
        return exact, avail // exact, 0
    unit = -(-avail // max_slots)
    return unit, avail // unit, spare


def _optimal_table(chain: Chain, budget_bytes: int, units: _dp.Units, max_slots: int
                   ) -> Segment | None:
    """The cost table's cheapest plan that the simulator finds within ``budget_bytes``, among
    those at the budget's own column and the extra ones above it; ``None`` if none is finite."""
    avail = budget_bytes - chain.fixed_bytes
    unit, base, extra = _slot_size(units, avail, max_slots)
    table = _dp.CostTable(units.in_slots(unit), base + extra)
    col = table.column()
    # From the budget's column up, the first column of each value the table takes (the most
    # frugal plan at that compute); the budget's own column fits by the NOTE's induction.
    cols = [c for c in range(base, base + extra + 1)
            if col[c] < _dp.INF and (c == base or col[c] < col[c - 1])]
    if not cols:
        return None

    def fits(i: int) -> bool:
        if cols[i] == base:
            return True
        return simulate(chain, table.tree(len(chain), cols[i])).peak_bytes <= budget_bytes

    # Whether a column's plan fits is near enough monotone in the column to bisect: the
    # cheapest column first, then the boundary between the lowest and it.
    last = len(cols) - 1
    if fits(last):
        return table.tree(len(chain), cols[last])
    if not fits(0):
        return None
    return table.tree(len(chain), cols[last_true(fits, 0, last)])


def _uniform_net(chain: Chain, budget_bytes: int, best: Segment, bar: float) -> Segment:
    """``best`` (whose compute is ``bar``), or a ``checkpoint_sequential`` plan that fits at less
    compute. They are tried cheapest first and only while cheaper, at most ``tries`` of them."""
    n, atoms = len(chain), chain.checkpoint_atoms()
    ends = [0.0]
    for a, b in atoms:
        ends.append(ends[-1] + sum(s.forward_cost for s in chain.stages[a:b]))
    baseline = sum(s.forward_cost + s.backward_cost for s in chain.stages)

    def recomputed(k: int) -> float:  # the checkpointed atoms' forward runs twice
        return ends[(len(atoms) // k) * (k - 1)]

    tries = max(8, 20_000 // n)  # simulating a long chain's plans is not free
    for k in sorted(range(1, len(atoms) + 1), key=recomputed)[:tries]:
        if baseline + recomputed(k) >= bar:
            break
        tree = uniform_tree(n, k, atoms)
        sim = simulate(chain, tree)
        if sim.compute < bar and sim.peak_bytes <= budget_bytes:
            return tree
    return best


def check_strategy(strategy: str) -> None:
    """The one check of a planner strategy's name (``memprop.plan``, ``memprop.checkpoint``,
    the CLI and :func:`solve` all call it)."""
    if strategy not in STRATEGIES:
        raise UsageError(f"strategy {strategy!r} does not exist: use one of "
                         f"{', '.join(STRATEGIES)}")


def solve(
    chain: Chain,
    budget_bytes: int,
    strategy: str = "optimal",
    *,
    strict: bool = True,
    max_slots: int = DEFAULT_MAX_SLOTS,
    max_units: int = DEFAULT_MAX_UNITS,
) -> Plan:
    """The plan of ``strategy`` for ``chain`` under ``budget_bytes`` (a cap on the training peak,
    ``fixed_bytes`` included). Raises :class:`BudgetInfeasibleError` when nothing fits, unless
    ``strict=False``: then the returned plan has ``feasible=False`` and the lowest peak found.
    Where the chain has the head option (``Chain.heads``, NOTE [ The head option ] in
    ``memprop.plan.chain``), every chunk count's chain is solved too and the plan of least
    compute under the budget is taken: the option only where it pays, and the count that pays
    most (``none`` never takes it)."""
    check_strategy(strategy)
    plan = _solve_one(chain, budget_bytes, strategy, max_slots, max_units)
    for head in chain.heads if strategy != "none" else ():
        chunked = _solve_one(head, budget_bytes, strategy, max_slots, max_units)
        plan = _cheaper(plan, chunked, head.head_chunks)
    if strict and not plan.feasible:
        floor = plan.min_feasible_bytes
        raise BudgetInfeasibleError(
            f"budget {format_bytes(budget_bytes)} is below the smallest feasible peak, "
            f"{least_budget_words(floor)}, for this {len(chain)}-stage chain with strategy "
            f"{strategy!r}: raise the budget to at least {cli_size(floor)} or lower the batch "
            "size",
            budget_bytes=budget_bytes,
            min_feasible_bytes=floor,
        )
    return plan


def _cheaper(own: Plan, chunked: Plan, chunks: int) -> Plan:
    """Of the plan taken so far (the model's own head, or fewer chunks) and the plan with the
    head in ``chunks`` chunks, the one of least compute under the budget (the lower peak when
    neither fits), measured against the model's own unplanned step; ties keep the plan taken
    so far."""
    floor = min(own.min_feasible_bytes, chunked.min_feasible_bytes)
    if own.feasible and not (chunked.feasible and chunked.compute < own.compute):
        take_chunked = False
    elif chunked.feasible:
        take_chunked = True
    else:
        take_chunked = chunked.peak_bytes < own.peak_bytes
    if not take_chunked:
        return dataclasses.replace(own, min_feasible_bytes=floor)
    return dataclasses.replace(
        chunked, min_feasible_bytes=floor, head_chunks=chunks,
        baseline_peak_bytes=own.baseline_peak_bytes, baseline_compute=own.baseline_compute,
        cost_note="; ".join(n for n in (chunked.cost_note, _head_note(chunks)) if n))


def _head_note(chunks: int) -> str:
    return (f"the head and the loss in {chunks} chunks of tokens, each recomputed in the "
            "backward (the full logits never held)")


def _solve_one(chain: Chain, budget_bytes: int, strategy: str, max_slots: int,
               max_units: int) -> Plan:
    """The plan of ``strategy`` for ``chain`` alone (its head as it is), feasible or not."""
    n = len(chain)
    baseline = simulate(chain, flat(n))
    if strategy == "none":
        tree, floor = flat(n), baseline.peak_bytes
    elif strategy == "uniform":
        atoms = chain.checkpoint_atoms()
        trees = (uniform_tree(n, k, atoms) for k in _segment_counts(len(atoms)))
        sims = [(simulate(chain, t), t) for t in trees]
        floor = min(s.peak_bytes for s, _ in sims)
        fits = [(s, t) for s, t in sims if s.peak_bytes <= budget_bytes]
        pool = fits or [(s, t) for s, t in sims if s.peak_bytes == floor]
        tree = min(pool, key=lambda st: (st[0].compute, st[0].peak_bytes))[1]
    else:
        tree, floor = _optimal(chain, budget_bytes, max_slots, max_units)
    sim = simulate(chain, tree)
    feasible = sim.peak_bytes <= budget_bytes
    grouped = grouping_note(chain, max_units) if strategy == "optimal" else ""
    return Plan(
        budget_bytes=budget_bytes,
        strategy=strategy,
        cost_model=chain.cost_model,
        cost_note="; ".join(note for note in (chain.cost_note, grouped) if note),
        feasible=feasible,
        min_feasible_bytes=floor,
        tree=tree,
        stage_names=tuple(s.name for s in chain.stages),
        forward_runs=sim.forward_runs,
        peak_bytes=sim.peak_bytes,
        compute=sim.compute,
        baseline_peak_bytes=baseline.peak_bytes,
        baseline_compute=baseline.compute,
        selective={c.start: option for c in tree.children if isinstance(c, Segment)
                   and (option := chain.option_of(c)) is not None},
        draws_random=tuple(s.draws_random for s in chain.stages),
    )


def _segment_counts(atoms: int) -> list[int]:
    """The segment counts ``uniform`` tries (NOTE [ Planning time linear in depth ]): every one
    up to ``UNIFORM_ALL_SEGMENTS``, then spaced by ``UNIFORM_SPACING``, and all of them."""
    counts = set(range(1, min(atoms, UNIFORM_ALL_SEGMENTS) + 1))
    k = float(UNIFORM_ALL_SEGMENTS)
    while k < atoms:
        counts.add(round(k))
        k *= UNIFORM_SPACING
    counts.add(atoms)
    return sorted(counts)


def least_budget_words(n: int) -> str:
    """A least feasible peak of ``n`` bytes in words that agree with the budget advised
    (:func:`cli_size`, rounded up): the bytes, and the size rounded up, never a figure below
    ``n`` (``format_bytes`` rounds to nearest, and 2.58 MiB would read as a budget that
    works)."""
    return f"{n:,} bytes ({cli_size(n)} rounded up)"


def cli_size(n: int) -> str:
    """A size the ``--budget`` flag parses back to at least ``n`` bytes (rounded up)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            hundredths = -(-n * 100 // scale)
            return f"{hundredths / 100:.2f}".rstrip("0").rstrip(".") + unit
    return str(n)
