"""Griewank's binomial count (Algorithm 799, "Revolve"), as an oracle for the ``optimal`` planner.

Revolve reverses ``l`` steps ``x_{i+1} = F_i(x_i)`` with ``c`` checkpoint slots, the initial
state ``x_0`` occupying one of them (the usual convention: with ``c = 1`` only ``x_0`` is stored).
A step is either *advanced* (``F_i`` without a tape, cost 1) or *taped* (``F_i`` recording, then
reversed at once); every step is taped exactly once, so the taped steps and reversals cost the
same in every schedule, and the schedule's price is the number of advances. The least number of
advances is

    t(l, c) = r * l - beta(c + 1, r - 1)    for beta(c, r - 1) < l <= beta(c, r),

where ``beta(c, r) = C(c + r, c)`` is the longest chain that ``c`` slots reverse with every step
advanced at most ``r`` times, and ``r``, the repetition number, is the least ``r`` with
``l <= beta(c, r)``. With ``c >= l - 1`` this is ``l - 1`` (one sweep storing every state but the
last); with ``c = 1`` it is ``l (l - 1) / 2``.

The tests (``tests/unit/test_plan_revolve.py``, its only users: it lives under ``tests/``) hold
this formula equal to the classic recursion (advance to ``x_s``, store it, reverse ``s..l`` with
one slot fewer, then ``0..s`` with all of them), and ``optimal`` equal to it on uniform chains
whose memory model coincides with Revolve's.
"""

from __future__ import annotations

from math import comb

__all__ = ["beta", "repetition_number", "revolve_advances"]


def beta(c: int, r: int) -> int:
    """``C(c + r, c)``: the most steps ``c`` slots reverse advancing no step more than ``r``
    times (0 for ``r < 0``)."""
    if c < 0:
        raise ValueError(f"c={c}: give c >= 0")
    return comb(c + r, c) if r >= 0 else 0


def repetition_number(steps: int, slots: int) -> int:
    """``r``: the least ``r`` with ``l <= beta(c, r)`` (``l = steps``, ``c = slots``)."""
    _check(steps, slots)
    r = 0
    while beta(slots, r) < steps:
        r += 1
    return r


def revolve_advances(steps: int, slots: int) -> int:
    """``t(l, c)``: the least number of untaped forward steps that reverse ``l = steps`` steps
    with ``c = slots`` checkpoint slots, ``x_0``'s included."""
    _check(steps, slots)
    r = repetition_number(steps, slots)
    return r * steps - beta(slots + 1, r - 1)


def _check(steps: int, slots: int) -> None:
    if steps < 1 or slots < 1:
        raise ValueError(f"steps={steps}, slots={slots}: Revolve needs at least 1 step and 1 "
                         "slot (x_0's slot included)")
