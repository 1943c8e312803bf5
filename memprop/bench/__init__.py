"""``memprop bench``: the speed and memory goals, measured side by side in one run.

Each part returns a ``BenchReport`` (a title, the machine, rows, and a Markdown rendering with the
ratios); ``memprop bench`` writes each as ``reports/NAME.md`` and ``reports/NAME.json``. Timings
are medians of interleaved repeats, so a noisy machine slows every contender alike; the ratios,
not the seconds, are the result.
"""

from memprop.bench.common import BenchReport, machine

__all__ = ["BenchReport", "machine"]
