"""The one integer search, against a linear scan."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from memprop.search import largest_true, last_true


@given(st.integers(1, 500), st.integers(0, 2000), st.integers(1, 3000))
def test_largest_true_is_the_linear_scans(start: int, extra: int, span: int) -> None:
    threshold = start + extra  # holds up to and including the threshold
    limit = start + span
    calls: list[int] = []

    def holds(n: int) -> bool:
        calls.append(n)
        return n <= threshold

    expected = max(n for n in range(start, limit + 1) if holds(n))
    calls.clear()
    assert largest_true(holds, start=start, limit=limit) == expected
    assert len(calls) <= 4 * limit.bit_length()  # doubling and bisection, not a scan


@given(st.integers(0, 100), st.integers(1, 400), st.integers(1, 50))
def test_last_true_within_its_resolution(low: int, width: int, resolution: int) -> None:
    high = low + width
    threshold = low + width // 3

    found = last_true(lambda n: n <= threshold, low, high, resolution=resolution)
    assert found <= threshold < found + max(1, resolution)
