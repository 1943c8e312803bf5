"""The one search memprop runs over integers: the largest value for which a monotone test holds
(a batch that fits, a plan's column that fits a budget)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["largest_true", "last_true"]


def last_true(holds: Callable[[int], bool], low: int, high: int, *, resolution: int = 1) -> int:
    """The largest ``n`` in ``[low, high)`` with ``holds(n)``, by bisection, given ``holds(low)``,
    not ``holds(high)`` and a test that is true then false; within ``resolution`` of it when
    that is coarser than 1."""
    while high - low > max(1, resolution):
        middle = (low + high) // 2
        low, high = (middle, high) if holds(middle) else (low, middle)
    return low


def largest_true(holds: Callable[[int], bool], *, start: int, limit: int,
                 resolution: int = 1) -> int:
    """The largest ``n`` in ``[start, limit]`` with ``holds(n)``, given ``holds(start)`` and a
    test that is true then false: doubling from ``start``, then bisection. ``limit`` when the
    test still holds there."""
    low, high = start, min(2 * start, limit)
    while high > low and holds(high):
        if high == limit:
            return limit
        low, high = high, min(2 * high, limit)
    return last_true(holds, low, high, resolution=resolution)
