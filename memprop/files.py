"""Writing a file whole or not at all, for every writer in memprop (reports, the rates cache)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["replace_atomically"]


def replace_atomically(target: str | Path, payload: bytes, *,
                       adopt: Callable[[int], None] | None = None) -> None:
    """Write ``payload`` to ``target`` through a temporary file beside it, flushed to disk and
    renamed over it: a reader, or a crash, sees the old file or the new one, never half of one.
    ``adopt(descriptor)`` gives the temporary file its mode (and owner) before the rename
    (``mkstemp`` makes it private to the writer). Missing folders are made. Raises ``OSError``."""
    folder, base = os.path.split(os.fspath(target))
    folder = folder or "."
    os.makedirs(folder, exist_ok=True)
    # The name is cut short so that a target near the 255-byte limit still gets one.
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{base[:64]}.", suffix=".tmp")
    try:
        try:
            if adopt is not None:
                adopt(handle)
            view = memoryview(payload)
            while view:
                view = view[os.write(handle, view):]
            os.fsync(handle)  # the data is on disk before the name points at it
        finally:
            os.close(handle)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
