"""The dynamic programs behind ``optimal``: least compute under a memory cap, and least peak.

Both recurse over the persistent schedules of Beaumont et al.'s rotor, on *units* (a stage, or a
run of consecutive stages kept or checkpointed together when the chain is grouped for speed).
``solve(a, b, h, m)`` runs units ``a..b`` forward then backward with ``m`` bytes above what its
context holds throughout; ``h`` says whether that context holds ``x_a`` (a checkpoint or a tape that
outlives the sub-schedule) or the sub-schedule owns it as a flow. Either

- **keep** unit ``a`` (its tape ``ret[h][a]`` held while ``a+1..b`` run), then ``b`` is reached
  with ``h' = so[a]`` (whether that tape holds ``x_{a+1}``); or
- **checkpoint** ``a..s-1``: run it without tapes holding ``x_a``, solve ``s..b`` (owning
  ``x_s``) and, when backward returns, re-run ``a..s-1`` with the same memory (``h = 1``: the
  checkpoint holds ``x_a``).

A checkpoint of units whose stages draw random numbers also holds the generators' state
(``stash``) from its first forward to the end of its backward, never shared, and fork_rng's copy
through its re-run's forward (NOTE [ The memory model ] in ``memprop.plan.chain``): every moment
of the rest of the segment and of the checkpoint's own re-run and backward is ``stash`` higher,
and the re-run is the sub-problem's *variant* 1, in which every forward moment of its first
sweep (its kept units' forwards, its nested checkpoints' first forwards: not their re-runs,
which come in the backward) is ``stash`` higher again. Tables are indexed ``[v]`` by variant.

The last unit of every segment is kept (checkpointing it would re-run it at once).
``g_b``, the gradient ``d_{b+1}`` that a re-run segment's context handed it, is live through the
forward moments of ``a..b`` and freed by ``b``'s backward; so are the parameter gradients of every
stage after ``b`` (persistent schedules differentiate strictly in reverse, so a segment re-run
during the backward sees them all live, and its budget shrinks by them). The top-level segment
(the only one that ends with the last unit) has neither until the loss. Each unit's moments are
folds of its own schedule by the one memory model (:class:`memprop.plan.memory.Ledger`,
:func:`make_units`), so each is the one the simulator sees.

# NOTE [ Slots and why rounding is safe ]
The cost table discretises bytes into slots of ``u`` bytes: every size is rounded *up* to whole
slots, the budget *down*. A constraint ``sum(sizes) <= m`` checked as ``sum(ceil(size/u)) <=
floor(m/u)`` implies the exact one, and the memory passed to a sub-problem, ``floor(m/u) -
ceil(r/u)`` slots, is at most ``(m - r)/u``, so by induction every plan the table accepts fits in
exact bytes. ``u`` is the gcd of all sizes when that leaves at most ``max_slots`` slots plus
the extra columns below (then the table is exact), else ``ceil(m/max_slots)``.

# NOTE [ Slots at the budget's boundary ]
Rounding is safe but loses plans: one whose exact peak is the budget is priced up to one slot
too high per rounded term, and the budget one slot too low. A constraint sums at most ``2 U + 2``
terms on ``U`` units (a tape and a stored input per unit on the way down, then a moment and a
gradient), ``4 U + 2`` with the generators' states (two more per checkpoint), so every plan that
fits in exact bytes is in the table that many columns above the budget's own. The table is
built with those extra columns (:meth:`CostTable.column` gives the whole chain's cost at each);
the budget's own column fits by the induction above, a column
above it only if the simulator says so. ``solvers._optimal_table`` bisects over the columns
where the cost drops for the cheapest plan that fits; the budget is never exceeded, since every
plan it returns was either at the safe column or simulated within the budget. Not exact still:
each column shows one plan of its cost, and a cheaper plan that fits may be hidden behind one
that does not at every column (uniform chains of 4 KiB states and 3 MB tapes lose a checkpoint
this way); ``solve`` keeps the exact least-peak plan and ``checkpoint_sequential``'s plans as nets.

Speed: both tables are filled by diagonal (segment length ``L``), vectorised over every start
``a`` and, for costs, over the memory axis; the split offset ``k`` is the only Python loop of the
cost table: ``n^2/2`` pairs of numpy operations (an add, a minimum) on ``(n - L, slots)`` arrays,
a checkpoint's first forward masked only in the rows where neither part's first finite column
implies it. ``min_peak`` takes each diagonal as one expression over every split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memprop.plan.actions import Backward, Keep, Loss, Run
from memprop.plan.chain import Chain
from memprop.plan.memory import Ledger
from memprop.plan.schedule import Child, Segment
from memprop.plan.selective import Option

INF = math.inf
_INF = INF
_NEVER = np.iinfo(np.int64).max // 4
"""A peak no plan reaches, for the least-peak table's forbidden choices (room to add to it)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Units:
    """Per-unit moments in bytes (or slots), indexed ``[h][unit]`` where they depend on ``h``."""

    bounds: tuple[tuple[int, int], ...]
    """Each unit's stages ``[start, stop)``."""
    xin: np.ndarray
    """Size of the unit's input activation."""
    dout: np.ndarray
    """Size of the gradient of its output, plus the parameter gradients of every later stage and
    the model's output (held by the caller) and what the loss left: what the context of a segment
    ending with this unit holds while it re-runs."""
    fk: np.ndarray
    """Forward moment when kept, shape ``(2, n)``."""
    ret: np.ndarray
    """Bytes the kept unit holds until its backward, ``(2, n)``."""
    bm: np.ndarray
    """Backward moment, its output's gradient included, ``(2, n)``."""
    lm: np.ndarray
    """Loss moment when the unit is last, ``(2, n)``."""
    so: np.ndarray
    """Whether the kept unit's tape holds its output."""
    fn_first: np.ndarray
    """Forward moment without tapes, the unit first in its checkpoint."""
    fn_flow: np.ndarray
    """Forward moment without tapes, its input a flow."""
    cost_f: np.ndarray
    """Forward cost."""
    cost_b: np.ndarray
    """Backward cost."""
    pinned: np.ndarray
    """Whether the unit holds a pinned stage (it is never part of a checkpointed segment)."""
    opt_cache: tuple[np.ndarray, ...] = ()
    """Per unit, its selective options' kept bytes (``Stage.options``; single-stage units only,
    empty elsewhere)."""
    opt_fk: tuple[np.ndarray, ...] = ()
    """Per unit, each option's re-run forward moment (``fk[1]`` with the option's transient)."""
    opt_saved: tuple[np.ndarray, ...] = ()
    """Per unit, the recomputation each option saves."""
    draws: np.ndarray | None = None
    """Whether the unit's stages draw random numbers (None: none does)."""
    stash: int = 0
    """What a checkpoint around a unit that ``draws`` keeps of the generators' state."""

    _pinned_before: np.ndarray = field(init=False, repr=False, compare=False)
    """``_pinned_before[a]``: pinned units among the first ``a`` (for ``checkpointable``)."""
    _draws_before: np.ndarray = field(init=False, repr=False, compare=False)
    """``_draws_before[a]``: units that draw among the first ``a`` (for ``stashes``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pinned_before",
                           np.concatenate([[0], np.cumsum(self.pinned.astype(np.int64))]))
        draws = (np.zeros(len(self.bounds), dtype=np.int64) if self.draws is None or not self.stash
                 else self.draws.astype(np.int64))
        object.__setattr__(self, "_draws_before", np.concatenate([[0], np.cumsum(draws)]))

    @property
    def keeps_states(self) -> bool:
        """Whether some checkpoint would keep the generators' state (a unit draws)."""
        return bool(self.stash and self._draws_before[-1])

    def stashes(self, k: int, rows: int) -> np.ndarray:
        """What a checkpoint of the ``k`` units from each start ``a < rows`` keeps of the
        generators' state: ``stash`` or 0."""
        inside = self._draws_before
        return np.asarray(self.stash * (inside[k : k + rows] > inside[:rows]), dtype=np.int64)

    def stash_of(self, a: int, k: int) -> int:
        """:meth:`stashes` for the one checkpoint of units ``a..a+k-1``."""
        return self.stash if self._draws_before[a + k] > self._draws_before[a] else 0

    def checkpointable(self, k: int, rows: int) -> np.ndarray:
        """Whether the ``k`` units from each start ``a < rows`` may form a checkpoint."""
        inside = self._pinned_before
        return np.asarray(inside[k : k + rows] - inside[:rows] == 0)

    @property
    def n(self) -> int:
        return len(self.bounds)

    def in_slots(self, u: int) -> Units:
        def up(a: np.ndarray) -> np.ndarray:
            return -(-a // u)

        return Units(
            bounds=self.bounds, xin=up(self.xin), dout=up(self.dout), fk=up(self.fk),
            ret=up(self.ret), bm=up(self.bm), lm=up(self.lm), so=self.so,
            fn_first=up(self.fn_first), fn_flow=up(self.fn_flow),
            cost_f=self.cost_f, cost_b=self.cost_b, pinned=self.pinned,
            opt_cache=tuple(up(c) for c in self.opt_cache),
            opt_fk=tuple(up(f) for f in self.opt_fk), opt_saved=self.opt_saved,
            draws=self.draws, stash=-(-self.stash // u),
        )

    def gcd(self) -> int:
        parts = [self.xin, self.dout, self.fk, self.ret, self.bm, self.lm, self.fn_first,
                 self.fn_flow, *self.opt_cache, *self.opt_fk,
                 np.array([self.stash] if self.keeps_states else [], dtype=np.int64)]
        return int(np.gcd.reduce(np.concatenate([np.ravel(p) for p in parts])))


def _context(chain: Chain, start: int, h: int, **margins: Any) -> tuple[Ledger, int]:
    """A ledger entered as a sub-problem's context leaves unit ``start``: holding ``x_start``
    (``h = 1``, a checkpoint or a tape that outlives the sub-schedule) or not (the unit owns it
    as a flow), the flow reference on it taken; and the context's own bytes, which every moment
    of the unit is counted above."""
    ledger = Ledger(chain, **margins)
    if h:
        ledger.hold(start)
    base = ledger.live
    ledger.hold(start)
    ledger.peak = base
    return ledger, base


def _kept_unit(chain: Chain, start: int, stop: int, h: int, option: int = 0
               ) -> tuple[int, int, int, int, bool]:
    """Stages ``[start, stop)`` run normally, folded by the memory model: (forward moment,
    retained, backward moment, loss moment, output held), above the context. With ``h = 1`` the
    context holds ``x_start``; with an ``option``, the stage is the re-run of that selective
    option. The backward moment counts the parameter gradients born inside the unit, not those
    of later stages (:func:`make_units` adds them). The last unit keeps ``x_n`` (the caller's)
    and starts its backward with what the loss left."""
    # The forward's locals (NOTE in plan/chain.py), counted at every forward moment, re-runs
    # included: the DP is safe there, the simulator exact.
    ledger, base = _context(chain, start, h, forward_margin=chain.forward_held_total(),
                            holds_locals=False)
    ledger.fold(Run(i, Keep.TAPE, option) for i in range(start, stop))
    fk = ledger.peak - base
    last = stop == len(chain)
    if not last:
        ledger.release(stop)  # the flow handed on to the rest of the segment
    ret, so = ledger.live - base, ledger.holds(stop)
    ledger.peak = base
    if last:
        ledger.fold((Loss(),))
        lm = ledger.peak - base
    else:
        lm = 0
        ledger.live += chain.act_bytes(stop)  # d_stop, handed back by the rest
    ledger.peak = base
    ledger.fold(Backward(i) for i in reversed(range(start, stop)))
    return fk, ret, ledger.peak - base, lm, so


def _dropped_unit(chain: Chain, start: int, stop: int, h: int) -> int:
    """The forward moment of stages ``[start, stop)`` run without tapes, above the context:
    first in its checkpoint (``h = 1``: the checkpoint holds ``x_start``) or after other units
    of it (``h = 0``: ``x_start`` a flow); the forward's locals counted at every moment."""
    ledger, base = _context(chain, start, h, forward_margin=chain.forward_held_total(),
                            holds_locals=False)
    ledger.fold(Run(i, Keep.NOTHING) for i in range(start, stop))
    return ledger.peak - base


def make_units(chain: Chain, bounds: list[tuple[int, int]]) -> Units:
    """The units' moments and costs, each folded by the memory model (:mod:`memprop.plan.memory`)
    over the unit's own schedule, and the context a unit sees in the backward."""
    walks = [[_kept_unit(chain, a, b, h) for a, b in bounds] for h in (0, 1)]

    def col(c: int) -> np.ndarray:
        return np.array([[w[c] for w in walks[h]] for h in (0, 1)], dtype=np.int64)

    def x(j: int) -> int:  # x_j's storage (the model's input, which weighs 0, for a view of it)
        return chain.storage_bytes(chain.storage_of(j))

    flow = [_dropped_unit(chain, a, b, 0) for a, b in bounds]
    first = [_dropped_unit(chain, a, b, 1) for a, b in bounds]
    # Backward runs strictly in reverse: while a unit is differentiated, the parameter gradients
    # of every later stage are live, and so are they while a segment ending there is re-run; so
    # are the model's output, which the caller holds, and what the loss left besides d_n (the
    # last unit's walk counts those itself).
    n = len(chain)
    after_last = (chain.storage_bytes(chain.storage_of(n))
                  + chain.loss_left_bytes() - chain.freed_grad_bytes(n - 1))
    later = np.array([chain.gradients_from(b) + (after_last if b < n else 0) for _, b in bounds],
                     dtype=np.int64)
    return Units(
        bounds=tuple(bounds),
        xin=np.array([x(a) for a, _ in bounds], dtype=np.int64),
        dout=np.array([chain.act_bytes(b) for _, b in bounds], dtype=np.int64) + later,
        fk=col(0), ret=col(1), bm=col(2) + later[None, :], lm=col(3),
        so=np.array([w[4] for w in walks[0]], dtype=bool),
        fn_first=np.array(first, dtype=np.int64),
        fn_flow=np.array(flow, dtype=np.int64),
        cost_f=np.array([sum(s.forward_cost for s in chain.stages[a:b]) for a, b in bounds]),
        cost_b=np.array([sum(s.backward_cost for s in chain.stages[a:b]) for a, b in bounds]),
        pinned=np.array([not chain.checkpointable(a, b) for a, b in bounds], dtype=bool),
        draws=np.array([chain.stash_bytes(a, b) > 0 for a, b in bounds], dtype=bool),
        stash=chain.rng_state_bytes,
        **_options(chain, bounds),
    )


def _options(chain: Chain, bounds: list[tuple[int, int]]) -> dict[str, tuple[np.ndarray, ...]]:
    """The units' selective options, for single-stage units that may be checkpointed."""
    found: list[tuple[Option, ...]] = [
        chain.stages[a].options if b - a == 1 and chain.checkpointable(a, b) else ()
        for a, b in bounds]
    return {
        "opt_cache": tuple(np.array([o.cache_bytes for o in f], dtype=np.int64) for f in found),
        "opt_fk": tuple(np.array([_kept_unit(chain, a, b, 1, o)[0]
                                  for o in range(1, len(f) + 1)], dtype=np.int64)
                        for f, (a, b) in zip(found, bounds, strict=True)),
        "opt_saved": tuple(np.array([o.saved_cost for o in f], dtype=np.float64) for f in found),
    }


def _windows(p: Units) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """``fnw[k-1][a]``: the tape-less forward moment of units ``a..a+k-1`` as a checkpoint;
    ``sumf[k-1][a]``: their forward cost; ``g[b]``: the gradient live while ``..b`` runs."""
    fnw, sumf = [p.fn_first], [p.cost_f]
    for k in range(2, p.n + 1):
        fnw.append(np.maximum(fnw[-1][:-1], p.fn_flow[k - 1:]))
        sumf.append(sumf[-1][:-1] + p.cost_f[k - 1:])
    g = np.append(p.dout[:-1], 0)
    return fnw, sumf, g


def _shift(arr: np.ndarray, by: np.ndarray, ar: np.ndarray) -> np.ndarray:
    """``out[r, m] = arr[r, m - by[r]]``, infinite where ``m < by[r]``."""
    width = arr.shape[1]
    out = np.full(arr.shape, _INF)
    for r, s in enumerate(by.tolist()):
        if s < width:
            out[r, s:] = arr[r, : width - s]
    return out


def _shift_rows(arr: np.ndarray, rows: np.ndarray, by: int) -> np.ndarray:
    """``arr`` with the rows where ``rows`` is true shifted right by ``by`` (:func:`_shift`
    where every row moves by ``by`` or not at all)."""
    if not by or not rows.any():
        return arr
    out: np.ndarray = arr.copy()
    out[rows] = _INF
    if by < arr.shape[1]:
        out[rows, by:] = arr[rows, : arr.shape[1] - by]
    return out


def _first_finite(arr: np.ndarray) -> np.ndarray:
    """Per row of a table non-increasing along ``m``: the first finite column (``m + 1`` when
    none is)."""
    return np.asarray(np.count_nonzero(np.isinf(arr), axis=1))


class CostTable:
    """``D[h][L][a, m]``: least compute for units ``a..a+L`` with ``m`` slots, ``inf`` if none;
    ``Dv[1]``, the same in variant 1 (a random checkpoint's re-run), when a unit draws."""

    def __init__(self, p: Units, slots: int) -> None:
        self.p, self.slots = p, slots
        n, ar = p.n, np.arange(slots + 1)
        self.fnw, self.sumf, self.g = fnw, sumf, g = _windows(p)
        self.fb = fb = p.cost_f + p.cost_b
        variants = (0, 1) if p.keeps_states else (0,)
        Dv: list[list[list[Any]]] = [[[None] * n, [None] * n] for _ in variants]
        for v in variants:
            for h in (0, 1):
                need = np.maximum(p.fk[h] + g + v * p.stash, p.bm[h])
                need[-1] = max(need[-1], p.lm[h][-1])
                Dv[v][h][0] = np.where(ar[None, :] >= need[:, None], fb[:, None], _INF)

        def checkpointed(L: int) -> np.ndarray:
            # A checkpoint of L + 1 units: its re-run (variant 1 where it draws) beside its
            # state, then its first forward's cost.
            draws = p.stashes(L + 1, n - L) > 0
            rerun = Dv[0][1][L] if len(variants) == 1 else np.where(
                draws[:, None], Dv[-1][1][L], Dv[0][1][L])
            out = _shift_rows(rerun, draws, p.stash) + sumf[L][:, None]
            out[~p.checkpointable(L + 1, n - L)] = _INF
            return np.asarray(out)

        # C[k-1][a] = D[1][k-1][a] + sumf[k-1][a]: a checkpoint of k units, its first forward and
        # its re-run, summed once rather than once per enclosing segment. lo0[v][L][a] and
        # loC[k-1][a]: the first finite column of Dv[v][0][L][a] and of C[k-1][a] (rows are
        # non-increasing in m, so finite from there on).
        C: list[Any] = [None] * n
        lo0: list[list[Any]] = [[None] * n for _ in variants]
        loC: list[Any] = [None] * n
        C[0] = checkpointed(0)
        loC[0] = _first_finite(C[0])
        for v in variants:
            lo0[v][0] = _first_finite(Dv[v][0][0])
        tmp = np.empty((n, slots + 1))
        for L in range(1, n):
            rows, gb = n - L, g[L:]
            for v in variants:
                best = np.full((rows, slots + 1), _INF)
                t = tmp[:rows]
                for k in range(1, L + 1):
                    # The rest of the segment beside the checkpoint's generators' state, if any.
                    stash = p.stashes(k, rows)
                    rest = _shift_rows(Dv[v][0][L - k][k : k + rows], stash > 0, p.stash)
                    np.add(C[k - 1][:rows], rest, out=t)
                    # The checkpoint's first forward, with the segment's gradient live, must
                    # fit: a bound that both parts' own first finite columns usually imply.
                    need = fnw[k - 1][:rows] + gb + stash + v * p.stash
                    short = need > np.maximum(loC[k - 1][:rows],
                                              lo0[v][L - k][k : k + rows] + stash)
                    for r in np.flatnonzero(short):
                        t[r, : need[r]] = _INF
                    np.minimum(best, t, out=best)
                src = np.where(p.so[:rows, None], Dv[v][1][L - 1][1:], Dv[v][0][L - 1][1:])
                for h in (0, 1):
                    ckpt = best if h == 1 else _shift(best, p.xin[:rows], ar)
                    keep = _shift(src, p.ret[h][:rows], ar) + fb[:rows, None]
                    need = np.maximum(p.fk[h][:rows] + gb + v * p.stash, p.bm[h][:rows])
                    keep[ar[None, :] < need[:, None]] = _INF
                    Dv[v][h][L] = np.minimum(keep, ckpt)
                lo0[v][L] = _first_finite(Dv[v][0][L])
            # The top-level segment's row (it ends with the last unit): its first unit may be
            # checkpointed alone under a selective option.
            D = Dv[0]
            a = rows - 1
            for o in range(len(p.opt_cache[a])):
                t = self.option_cost(a, o, D[0][L - 1][a + 1])
                D[1][L][a] = np.minimum(D[1][L][a], t)
                D[0][L][a] = np.minimum(D[0][L][a], _shift(t[None, :], p.xin[a:a + 1], ar)[0])
            lo0[0][L] = _first_finite(D[0][L])
            C[L] = checkpointed(L)
            loC[L] = _first_finite(C[L])
        self.Dv, self.D, self.C = Dv, Dv[0], C

    def option_cost(self, a: int, o: int, rest: np.ndarray) -> np.ndarray:
        """The least compute, at every ``m`` (the context holding ``x_a``), of top-level units
        ``a..`` when ``a`` is checkpointed alone under its option ``o``: its first forward, the
        rest (``rest``: their least compute at each ``m``) beside the kept outputs, then its
        re-run, which the kept outputs make cheaper, and its backward."""
        p, ar = self.p, np.arange(self.slots + 1)
        stash = p.stash_of(a, 1)
        cache = int(p.opt_cache[a][o]) + stash
        t = np.full(self.slots + 1, _INF)
        if cache <= self.slots:
            t[cache:] = rest[: self.slots + 1 - cache]
        t += self.fb[a] + self.sumf[0][a] - p.opt_saved[a][o]
        need = max(p.opt_fk[a][o] + self.g[a] + 2 * stash, p.bm[1][a] + stash,
                   self.fnw[0][a] + stash)
        t[ar < need] = _INF
        return t

    def best(self, m: int | None = None) -> float:
        """The least compute of the whole chain with ``m`` slots (default: all of them)."""
        return float(self.D[1][self.p.n - 1][0, self.slots if m is None else m])

    def column(self) -> np.ndarray:
        """:meth:`best` at every ``m``, non-increasing."""
        return np.asarray(self.D[1][self.p.n - 1][0])

    def tree(self, chain_len: int, m: int | None = None) -> Segment:
        """The plan that attains :meth:`best` at ``m`` slots (which must be finite)."""
        p = self.p

        def choose(a: int, b: int, h: int, m: int, v: int) -> tuple[str, int, int]:
            D = self.Dv[v]
            L, target = b - a, D[h][b - a][a, m]
            if m >= max(p.fk[h][a] + self.g[b] + v * p.stash, p.bm[h][a]) and m >= p.ret[h][a]:
                keep = D[int(p.so[a])][L - 1][a + 1, m - p.ret[h][a]] + self.fb[a]
                if keep == target:
                    return "keep", int(p.so[a]), int(m - p.ret[h][a])
            mp = int(m - (p.xin[a] if h == 0 else 0))
            for k in range(1, L + 1):
                stash = p.stash_of(a, k)
                if mp < self.fnw[k - 1][a] + self.g[b] + stash + v * p.stash:
                    continue
                val = self.C[k - 1][a, mp] + D[0][L - k][a + k, mp - stash]
                if val == target:
                    return "ckpt", k, mp
            if b == p.n - 1:
                for o in range(len(p.opt_cache[a])):
                    if self.option_cost(a, o, D[0][L - 1][a + 1])[mp] == target:
                        return "option", o + 1, int(mp - p.opt_cache[a][o] - p.stash_of(a, 1))
            raise AssertionError(f"no choice attains the table at {a}..{b}, h={h}, m={m}")

        return _rebuild(p, chain_len, self.slots if m is None else m, choose)


def min_peak(p: Units) -> tuple[int, Segment, int]:
    """The least peak over all plans (bytes above ``fixed_bytes``, exact), a plan attaining it,
    and the chain length it covers."""
    n = p.n
    fnw, _, g = _windows(p)
    variants = (0, 1) if p.keeps_states else (0,)
    # P[v][h][L, a]: the least peak of units a..a+L in variant v, as square arrays (the unused
    # corner stays 0) so that each diagonal is one numpy expression over every split k and
    # start a.
    P = [[np.zeros((n, n), dtype=np.int64), np.zeros((n, n), dtype=np.int64)]
         for _ in variants]
    F = np.zeros((n, n), dtype=np.int64)  # F[k-1, a] = fnw[k-1][a]
    for k in range(n):
        F[k, : n - k] = fnw[k]
    for v in variants:
        for h in (0, 1):
            P[v][h][0] = np.maximum(p.fk[h] + g + v * p.stash, p.bm[h])
            P[v][h][0][-1] = max(P[v][h][0][-1], p.lm[h][-1])
    drawn = p._draws_before
    for L in range(1, n):
        rows, gb = n - L, g[L:]
        ks = np.arange(1, L + 1)[:, None]
        starts = ks + np.arange(rows)[None, :]
        stash = p.stash * (drawn[starts] > drawn[:rows][None, :]).astype(np.int64)
        # A checkpoint's re-run and backward: variant 1 where it draws.
        rerun = P[-1][1][:L, :rows] if len(variants) == 1 else np.where(
            stash > 0, P[-1][1][:L, :rows], P[0][1][:L, :rows])
        allowed = np.array([p.checkpointable(k, rows) for k in range(1, L + 1)])
        for v in variants:
            cand = np.maximum(np.maximum(rerun + stash, P[v][0][L - ks, starts] + stash),
                              F[:L, :rows] + gb[None, :] + stash + v * p.stash)
            cand = np.where(allowed, cand, _NEVER)
            best = cand.min(axis=0)
            src = np.where(p.so[:rows], P[v][1][L - 1][1 : rows + 1],
                           P[v][0][L - 1][1 : rows + 1])
            for h in (0, 1):
                keep = np.maximum(np.maximum(p.fk[h][:rows] + gb + v * p.stash,
                                             p.bm[h][:rows]),
                                  p.ret[h][:rows] + src)
                ckpt = best + (p.xin[:rows] if h == 0 else 0)
                P[v][h][L, :rows] = np.minimum(keep, ckpt)

    def choose(a: int, b: int, h: int, m: int, v: int) -> tuple[str, int, int]:
        L, target = b - a, P[v][h][b - a][a]
        keep = max(p.fk[h][a] + g[b] + v * p.stash, p.bm[h][a],
                   p.ret[h][a] + P[v][int(p.so[a])][L - 1][a + 1])
        if keep == target:
            return "keep", int(p.so[a]), 0
        xa = p.xin[a] if h == 0 else 0
        for k in range(1, L + 1):
            if not p.checkpointable(k, a + 1)[a]:
                continue
            stash = p.stash_of(a, k)
            rerun = P[-1 if stash else 0][1][k - 1][a]
            if xa + max(rerun + stash, P[v][0][L - k][a + k] + stash,
                        fnw[k - 1][a] + g[b] + stash + v * p.stash) == target:
                return "ckpt", k, 0
        raise AssertionError(f"no choice attains the least peak at {a}..{b}, h={h}")

    peak = int(P[0][1][n - 1][0])
    length = p.bounds[-1][1]
    return peak, _rebuild(p, length, 0, choose), length


def _rebuild(p: Units, chain_len: int, m0: int, choose: Any) -> Segment:
    """Follow the choices from the top, without recursion (chains can be deeper than Python's
    stack), then build the Segments children-first."""
    # A task: units a..b, h, m, the selective option of a one-unit checkpoint (0: none), and
    # the variant (1: a random checkpoint's re-run).
    tasks: list[tuple[int, int, int, int, int, int]] = [(0, p.n - 1, 1, m0, 0, 0)]
    items: list[list[tuple[str, int, int]]] = []  # per task: ("keep", unit) or ("sub", task, k)
    i = 0
    while i < len(tasks):
        a, b, h, m, _, v = tasks[i]
        out: list[tuple[str, int, int]] = []
        while a < b:
            kind, x, m_next = choose(a, b, h, m, v)
            if kind == "keep":
                out.append(("keep", a, 1))
                a, h, m = a + 1, x, m_next
            elif kind == "option":
                tasks.append((a, a, 1, 0, x, 0))
                out.append(("sub", len(tasks) - 1, 1))
                a, h, m = a + 1, 0, m_next
            else:  # the checkpoint's re-run and the rest beside it, its state apart
                stash = p.stash_of(a, x)
                tasks.append((a, a + x - 1, 1, m_next - stash, 0, int(stash > 0)))
                out.append(("sub", len(tasks) - 1, x))
                a, h, m = a + x, 0, m_next - stash
        out.append(("keep", b, 1))
        items.append(out)
        i += 1
    built: dict[int, Segment] = {}
    for t in reversed(range(len(tasks))):
        children: list[Child] = []
        for kind, x, _ in items[t]:
            if kind == "keep":
                children.extend(range(*p.bounds[x]))
            else:
                children.append(built.pop(x))
        a, b, option = tasks[t][0], tasks[t][1], tasks[t][4]
        built[t] = Segment(start=p.bounds[a][0], stop=p.bounds[b][1], children=tuple(children),
                           option=option)
    top = built[0]
    assert top.start == 0 and top.stop == chain_len
    return top
