"""Sizes: parse what users type, render what they read. Memory is an ``int`` of bytes everywhere
else in memprop; units are converted only here."""

from __future__ import annotations

import re
from fractions import Fraction

from memprop.errors import UsageError

__all__ = ["format_bytes", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
MAX_SIZE_BYTES = 2**63 - 1
"""The largest size memprop takes (8 EiB): torch counts bytes in signed 64-bit integers, and
no machine comes near it."""


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``"1.5GiB"`` (binary), ``"2GB"`` (decimal) or ``"4096"``.

    ``KiB/MiB/GiB/TiB`` and the bare ``K/M/G/T`` are powers of 1024; ``KB/MB/GB/TB`` are powers of
    1000, as their standards say. Fractions of a byte are rounded down.
    """
    if isinstance(text, bool):
        raise UsageError(f"size {text!r} is not a size: give bytes or a string like '1.5GiB'")
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"size {text} is negative: give a number of bytes >= 0")
        return _bounded(text, str(text))
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise UsageError(
            f"size {text!r} does not parse: write a number and a unit, like '512MiB', "
            "'1.5GiB' (binary) or '2GB' (decimal)"
        )
    # Exact arithmetic: a float would round a long number, or overflow to infinity.
    return _bounded(int(Fraction(match.group(1)) * _UNITS[unit]), str(text).strip())


def _bounded(size: int, text: str) -> int:
    if size > MAX_SIZE_BYTES:
        shown = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"
        raise UsageError(f"size {shown} is more than 8 EiB (2**63 bytes), more than any "
                         "machine holds: give a size such as '512MiB' or '80GiB'")
    return size


def format_bytes(n: int) -> str:
    """``1610612736`` -> ``"1.50 GiB"``: binary units, three significant digits."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.0f} {unit}" if value >= 100 else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
