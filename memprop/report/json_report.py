"""JSON documents and other text, written by the rules of ``memprop.report.output``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memprop.report.output import write_output

__all__ = ["write_json", "write_text"]


def write_text(path: str | Path, text: str) -> str:
    """Write ``text`` to ``path`` (``-`` is standard output; a regular file is replaced whole or
    not at all); return how to name the destination in a message."""
    return write_output(path, text)


def write_json(path: str | Path, document: dict[str, Any]) -> str:
    """Write ``document`` as indented JSON, as ``write_text`` does."""
    return write_output(path, json.dumps(document, indent=2) + "\n")
