"""JSON documents on disk, written whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from memprop.errors import UsageError

__all__ = ["write_json", "write_text"]


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a crash leaves the old file, never half a new one.

    Missing parent folders are created; a path that is a folder is an error.
    """
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{target} is a folder: give a file path to write to")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        # mkstemp makes the file private (0600); a report is an ordinary file, readable as the
        # umask allows, like any file the user's tools would write.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, target)
    except OSError as error:
        raise UsageError(f"cannot write {target}: {error.strerror or error}") from error
    return target


def write_json(path: str | Path, document: dict[str, Any]) -> Path:
    return write_text(path, json.dumps(document, indent=2) + "\n")
