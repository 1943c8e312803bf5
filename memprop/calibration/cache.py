"""The file where this machine's measurements are kept (rates, pointwise timings, links), read
with suspicion and written atomically.

NOTE [ A cache is input ]
The cache file is written by memprop, but anything may stand at its path: a file an older
memprop wrote, one edited by hand or cut short, a FIFO, a folder. What is read is checked (a
loader refuses what it cannot use, with a ``ValueError``, ``TypeError`` or ``KeyError`` saying
why) and what is refused is measured again, with one warning line per problem (logged to
``memprop``: Python prints it on stderr when nothing is configured), never a traceback, a hang or a
number that is not one. Concurrent processes measure one at a time (a lock beside the file) and
the later ones read what the first measured: measurements taken while other memprops measure
are measurements of the load.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from memprop.files import replace_atomically

__all__ = ["cache_file", "checked_number", "locked", "read_cache", "remembered", "warn",
           "write_cache"]

T = TypeVar("T")
_LOG = logging.getLogger("memprop")
_warned: set[str] = set()
_unwritten: dict[tuple[str, str], Any] = {}
"""What was measured in this process but could not be written: not measured again."""


def warn(message: str) -> None:
    """One warning line on stderr (once per message and process)."""
    if message not in _warned:
        _warned.add(message)
        _LOG.warning("memprop: warning: %s", message)


def cache_file() -> Path:
    """``$XDG_CACHE_HOME/memprop/rates.json``, or ``~/.cache/...``: the XDG spec says a relative
    ``XDG_CACHE_HOME`` is invalid and to be ignored (it would put the cache wherever memprop
    happens to run)."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(root):
        root = str(Path.home() / ".cache")
    return Path(root) / "memprop" / "rates.json"


def checked_number(value: Any, name: str, low: float, high: float) -> float:
    """``value`` as a float if it is a finite number in ``[low, high]``, else a ``ValueError``
    naming ``name`` (strings, null, booleans, NaN, infinities and absurd sizes are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} is {value!r}, not a number")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise ValueError(f"{name} is {value!r}, outside {low:g}..{high:g}")
    return number


def remembered(key: str, measure: Callable[[], Any], load: Callable[[Any], T]) -> T:
    """What ``measure()`` found on this machine under ``key``, kept in the cache file: loaded
    from there when ``load`` accepts it (NOTE [ A cache is input ]), else measured (one process
    at a time) and written."""
    path = cache_file()
    if (str(path), key) in _unwritten:
        return load(_unwritten[str(path), key])
    found = _loaded(read_cache(), key, load)
    if found is not None:
        return found
    with locked():
        cached = read_cache()  # another process may have measured while this one waited
        found = _loaded(cached, key, load, quiet=True)
        if found is not None:
            return found
        cached[key] = measure()
        value = load(cached[key])
        if not write_cache(cached):
            _unwritten[str(path), key] = cached[key]
    return value


def _loaded(cached: dict[str, Any], key: str, load: Callable[[Any], T],
            quiet: bool = False) -> T | None:
    if key not in cached:
        return None
    try:
        return load(cached[key])
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        if not quiet:
            warn(f"{cache_file()} holds unusable figures for {key!r} ({_first_line(error)}): "
                 "measured again")
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def read_cache() -> dict[str, Any]:
    """Everything measured on this machine so far, by key; ``{}`` (with a warning) when what
    stands at the path is not a JSON object in a regular file."""
    path = cache_file()
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return {}
    except OSError as error:
        warn(f"cannot read {path} ({error.strerror}): rates measured again")
        return {}
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            warn(f"{path} is not a regular file: rates measured again")
            return {}
        data = os.read(descriptor, _MAX_CACHE_BYTES + 1)
    finally:
        os.close(descriptor)
    if len(data) > _MAX_CACHE_BYTES:
        warn(f"{path} is over {_MAX_CACHE_BYTES} bytes, not a cache memprop wrote: rates "
             "measured again")
        return {}
    try:
        found = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        warn(f"{path} is not JSON ({_first_line(error)}): rates measured again")
        return {}
    if not isinstance(found, dict):
        warn(f"{path} holds {type(found).__name__}, not an object: rates measured again")
        return {}
    return found


_MAX_CACHE_BYTES = 1 << 22
"""Far above what memprop writes (a few KiB): a bigger file is not its cache."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def write_cache(cached: dict[str, Any]) -> bool:
    """Write the cache back atomically (a temporary file renamed over it, so that a reader never
    sees half of it); ``False`` when it cannot be written, which costs a measurement per process,
    no more."""
    path = cache_file()
    try:
        text = json.dumps(cached, indent=2, allow_nan=False) + "\n"
        # As an ordinary file: mkstemp makes it private.
        replace_atomically(path, text.encode(), adopt=lambda handle: os.fchmod(handle, 0o644))
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        warn(f"cannot write {path} ({reason}): rates are measured again in each process")
        return False
    return True


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Hold the lock beside the cache file (NOTE [ A cache is input ]); without one (no
    ``fcntl``, a folder that cannot be written) the work goes on unlocked."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    lock = cache_file().with_name("rates.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, 0o644)
    except OSError:
        yield
        return
    try:
        waited = 0.0
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited >= LOCK_WAIT_S:
                    warn(f"{lock} stayed locked {LOCK_WAIT_S:.0f} s (a memprop stopped while "
                         "measuring?): measured without it")
                    break
                time.sleep(_LOCK_POLL_S)
                waited += _LOCK_POLL_S
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EINVAL, errno.EBADF):
                    raise
                break  # a file system without locks: unlocked
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


LOCK_WAIT_S = 120.0
"""How long a process waits for another's measurement (a few seconds, ten times over on a busy
machine) before it measures on its own rather than hang."""
_LOCK_POLL_S = 0.05
