"""What every benchmark report shares: the machine, medians of interleaved repeats, files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from memprop._version import __version__
from memprop.report.json_report import write_text

__all__ = ["BenchReport", "interleaved_medians", "machine"]


def machine() -> dict[str, Any]:
    """The machine the figures came from: they mean nothing without it."""
    described: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_bytes": int(psutil.virtual_memory().total),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "memprop": __version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return described


def interleaved_medians(
    contenders: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each contender, run in turn (a, b, c, a, b, c...) so that a slow patch
    of the machine slows them all."""
    for _ in range(warmup):
        for run in contenders.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            started = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchReport:
    name: str
    """File stem under reports/."""
    title: str
    summary: list[str]
    """Sentences that state each goal, the figure, and whether it was met."""
    columns: list[str]
    rows: list[dict[str, Any]]
    machine: dict[str, Any] = field(default_factory=machine)
    command: str = "memprop bench"

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", *self.summary, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in self.columns) + " |")
        described = ", ".join(f"{k} {v}" for k, v in self.machine.items() if v is not None)
        lines += ["", f"Machine: {described}.", f"Command: `{self.command}`.", ""]
        return "\n".join(lines)

    def write(self, folder: Path) -> list[Path]:
        document = {"schema_version": 1, **asdict(self)}
        markdown, data = folder / f"{self.name}.md", folder / f"{self.name}.json"
        write_text(markdown, self.markdown())
        write_text(data, json.dumps(document, indent=2) + "\n")
        return [markdown, data]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
