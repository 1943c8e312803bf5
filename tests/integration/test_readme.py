"""The README's thirty-second example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_thirty_second_example_runs_as_written() -> None:
    text = README.read_text()
    section = text[text.index("## Thirty seconds"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), str(README), "exec"), namespace)
    plan = namespace["plan"]
    # The figures the README's comments quote.
    assert round(plan.peak_bytes / 2**20) == 228  # type: ignore[attr-defined]
    assert round(plan.compute_overhead, 2) == 0.17  # type: ignore[attr-defined]
    big = namespace["big"]
    assert round(big.training_peak_bytes / 2**30, 1) == 2.8  # type: ignore[attr-defined]
