"""Every file memprop writes goes through ``write_output``, so every flag follows one set of rules.

* ``-`` (exactly that name) is standard output: text goes to ``sys.stdout``, bytes to its
  ``buffer``. No file called ``-`` is ever made.
* A symbolic link is followed to its final target, which is what gets written; the link stays a
  link. A dangling link creates its target.
* A path that exists and is not a regular file (``/dev/null``, ``/dev/full``, a FIFO, a terminal)
  is opened and written in place: replacing it would swap a device node or a pipe for a plain
  file. So is anything reached through ``/proc``, whatever it is. ``/dev/stdout`` (a link to
  ``/proc/self/fd/1``) and ``/dev/fd/N`` name this process's own open descriptors, even one a
  shell redirected into a regular file: those are written through the descriptor itself, as the
  shell does, so the bytes land where the descriptor's next write would have.
* A regular file, or a path that does not exist yet, is written whole or not at all: a temporary
  file beside the target, then ``os.replace``. A crash leaves the old file or the new one, never
  half of one. A replaced file keeps its permission bits (and, where allowed, its owner); a new
  one gets ``0o666`` less the umask, like any file the user's other tools make. Missing folders
  are created.

Every failure is a ``UsageError`` naming the path as given. ``check_outputs`` applies the same
rules before the work starts, so a bad path costs a second, not the minutes of a profile.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from memprop.errors import UsageError
from memprop.files import replace_atomically

__all__ = ["check_outputs", "write_output", "writes_to_stdout"]

_STDOUT = "-"
_MAX_LINKS = 40  # the kernel's own limit on links followed in one lookup


def write_output(path: str | Path, data: str | bytes) -> str:
    """Write ``data`` (text is UTF-8) to ``path`` by the module's rules.

    Returns how to name the destination in a message: ``"standard output"`` for ``-``, else the
    path as given.
    """
    name = _name(path)
    if name == _STDOUT:
        _write_stdout(data)
        return "standard output"
    payload = data.encode("utf-8") if isinstance(data, str) else data
    found = _stat(name)
    if found is not None and stat.S_ISDIR(found.st_mode):
        raise UsageError(f"cannot write {name}: it is a folder; give the path of a file in it")
    in_proc = _proc_hop(name)
    descriptor = None if in_proc is None or found is None else _own_descriptor(in_proc)
    if descriptor is not None:
        _write_descriptor(name, descriptor, payload)
    elif in_proc is not None or (found is not None and not stat.S_ISREG(found.st_mode)):
        _write_in_place(name, payload)
    else:
        _replace(name, found, payload)
    return name


def check_outputs(outputs: Mapping[str, str | Path | None]) -> None:
    """Refuse, before any work, outputs that ``write_output`` could not write or that clash.

    ``outputs`` maps each flag (``"--json"``) to its path; ``None`` means the flag was not given.
    Nothing is created and nothing is opened (opening a FIFO would block until a reader comes).
    """
    given = {flag: os.fspath(path) for flag, path in outputs.items() if path is not None}
    for flag, name in given.items():
        if not name:
            raise UsageError(f"{flag} was given an empty path: give a file path, or - for "
                             "standard output")
    to_stdout = [flag for flag, name in given.items() if name == _STDOUT]
    if len(to_stdout) > 1:
        every = "both" if len(to_stdout) == 2 else "all"
        raise UsageError(f"{_and(to_stdout)} {every} ask for standard output (-), where their "
                         "documents would run together: give - to one of them at most, and "
                         "files to the others")
    claimed: dict[str, tuple[str, str]] = {}
    for flag, name in given.items():
        if name == _STDOUT:
            continue
        _check_destination(flag, name)
        # Compare where the writes would land, so a.json, ./x/../a.json and a link to a.json
        # are one file: the second write would silently replace the first.
        real = os.path.realpath(name)
        if real in claimed:
            other, other_name = claimed[real]
            shown = name if name == other_name else f"{real} (as {other_name} and {name})"
            raise UsageError(f"{other} and {flag} both name {shown}: give each its own file")
        claimed[real] = (flag, name)


def writes_to_stdout(outputs: Mapping[str, str | Path | None]) -> bool:
    """Whether any of ``outputs`` is standard output (``-``, ``/dev/stdout``, or the file that
    standard output is redirected to): then the human report belongs on standard error."""
    try:
        stdout = os.fstat(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # replaced by a test, or closed
        stdout = None
    for path in outputs.values():
        if path is None:
            continue
        if os.fspath(path) == _STDOUT:
            return True
        if stdout is not None:
            try:
                found = os.stat(path)
            except OSError:
                continue
            if (found.st_dev, found.st_ino) == (stdout.st_dev, stdout.st_ino):
                return True
    return False


def _name(path: str | Path) -> str:
    name = os.fspath(path)
    if not name:
        # realpath("") is the working folder: an empty name must never reach the writer.
        raise UsageError("an output path is empty: give a file path, or - for standard output")
    return name


def _and(flags: list[str]) -> str:
    return ", ".join(flags[:-1]) + " and " + flags[-1]


def _stat(name: str) -> os.stat_result | None:
    """What ``name`` reaches, as the kernel follows it (magic /proc links included); ``None``
    when there is nothing there yet."""
    try:
        return os.stat(name)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:  # a loop of links, a folder that cannot be searched
        raise UsageError(f"cannot write {name}: {error.strerror or error}") from error


def _proc_hop(name: str) -> str | None:
    """The first name on the way from ``name`` to its target that lies in /proc (its folder
    resolved: ``/proc/<pid>/fd/1`` for ``/dev/stdout``), or ``None``.

    Only the links themselves are walked here: ``os.path.realpath`` would read /proc/self/fd/1
    as a path such as ``/proc/<pid>/fd/pipe:[1234]`` that cannot be opened, or as the file a
    shell redirected into, which must not be replaced under the shell's open descriptor.
    """
    hop = name
    for _ in range(_MAX_LINKS):
        folder = os.path.realpath(os.path.dirname(hop) or os.curdir)
        if folder == "/proc" or folder.startswith("/proc/"):
            return os.path.join(folder, os.path.basename(hop))
        try:
            target = os.readlink(hop)
        except OSError:  # not a link, or nothing there: the walk has reached the end
            return None
        hop = os.path.join(os.path.dirname(hop), target)
    return None


def _own_descriptor(hop: str) -> int | None:
    """The descriptor number when ``hop`` names one of this process's own descriptors."""
    folder, base = os.path.split(hop)
    if folder == f"/proc/{os.getpid()}/fd" and base.isascii() and base.isdigit():
        return int(base)
    return None


def _write_stdout(data: str | bytes) -> None:
    # Looked up now, not at import: tests and callers may have replaced it.
    stream = sys.stdout
    try:
        if isinstance(data, str):
            try:
                stream.write(data)
            except UnicodeEncodeError:
                # A console whose encoding cannot spell the text (LANG=C): send the UTF-8 bytes
                # every other destination gets. The encoder fails before writing anything.
                _binary_stdout(stream).write(data.encode("utf-8"))
        else:
            stream.flush()  # text already queued goes first
            binary = _binary_stdout(stream)
            binary.write(data)
            binary.flush()
        stream.flush()
    except OSError as error:  # a closed pipe (memprop ... --json - | head), a full disk
        raise UsageError(f"cannot write standard output: {error.strerror or error}") from error


def _binary_stdout(stream: object) -> BinaryIO:
    binary: BinaryIO | None = getattr(stream, "buffer", None)
    if binary is None:
        raise UsageError("cannot write binary data to standard output: here it takes text "
                         "only; give a file path instead of -")
    return binary


def _write_descriptor(name: str, descriptor: int, payload: bytes) -> None:
    # Written through the descriptor itself, as the shell does for /dev/stdout: reopening it
    # would start a second offset, and when a shell redirected it into a file with >, what the
    # descriptor writes next would land over these bytes.
    try:
        stream = {1: sys.stdout, 2: sys.stderr}.get(descriptor)
        if stream is not None:
            stream.flush()  # text queued for the same descriptor goes first
        _write_all(descriptor, payload)
    except OSError as error:
        raise UsageError(f"cannot write {name}: {error.strerror or error}") from error


def _write_in_place(name: str, payload: bytes) -> None:
    # O_APPEND: a regular file reached through /proc (another process's descriptor) gets the
    # bytes after what is already there, not over it; devices and FIFOs ignore it. O_NOCTTY:
    # opening a terminal must not make it this process's controlling terminal.
    try:
        handle = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            _write_all(handle, payload)
        finally:
            os.close(handle)
    except OSError as error:  # ENOSPC from /dev/full, ENXIO from a socket, EPIPE
        raise UsageError(f"cannot write {name}: {error.strerror or error}") from error


def _replace(name: str, found: os.stat_result | None, payload: bytes) -> None:
    target = os.path.realpath(name)  # the end of the link chain: the link itself stays
    try:
        replace_atomically(target, payload, adopt=lambda handle: _take_over(handle, found))
    except OSError as error:
        raise UsageError(f"cannot write {name}: {error.strerror or error}") from error


def _take_over(handle: int, found: os.stat_result | None) -> None:
    """Give the temporary file the mode (and owner) of the file it replaces; mkstemp made it
    0600, private to the writer."""
    if found is None:
        os.fchmod(handle, 0o666 & ~_umask())
        return
    made = os.fstat(handle)
    if (made.st_uid, made.st_gid) != (found.st_uid, found.st_gid):
        # root rewriting a user's report should not hand it to root. Others may not give a file
        # away: theirs becomes the new file, as with any editor that saves by renaming.
        with contextlib.suppress(PermissionError):
            os.fchown(handle, found.st_uid, found.st_gid)
    os.fchmod(handle, stat.S_IMODE(found.st_mode))  # after chown, which clears setuid bits


def _umask() -> int:
    # Linux shows the umask in /proc; setting it to read it back is the fallback, since another
    # thread creating a file in between would get the wrong mode.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_all(handle: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(handle, view):]


def _check_destination(flag: str, name: str) -> None:
    try:
        found = os.stat(name)  # stat does not open: a FIFO is safe to look at
    except (FileNotFoundError, NotADirectoryError):
        _check_new(flag, name)
        return
    except OSError as error:
        raise UsageError(f"{flag} {name}: cannot use it ({error.strerror or error}): choose "
                         "another path") from error
    if stat.S_ISDIR(found.st_mode):
        raise UsageError(f"{flag} {name} is a folder: give the path of a file to write")
    if stat.S_ISSOCK(found.st_mode):
        raise UsageError(f"{flag} {name} is a socket, which cannot be opened as a file: give a "
                         "file, a FIFO or - instead")
    if not os.access(name, os.W_OK):
        raise UsageError(f"{flag} {name} exists and is not writable: change its permissions "
                         "or choose another path")
    if stat.S_ISREG(found.st_mode) and _proc_hop(name) is None:
        folder = os.path.dirname(os.path.realpath(name))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {name}: its folder {folder} is not writable, and the new "
                             "file is made beside the old one: choose another path")


def _check_new(flag: str, name: str) -> None:
    ancestor = os.path.dirname(os.path.realpath(name))
    while not os.path.exists(ancestor):  # ends at "/" at the latest
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UsageError(f"{flag} {name}: {ancestor} is a file, not a folder, so nothing can "
                         "be made inside it: choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {name}: cannot create it, the folder {ancestor} is not "
                         "writable: choose a folder you can write to")
