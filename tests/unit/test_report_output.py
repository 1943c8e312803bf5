"""write_output and check_outputs: what each kind of destination ends up holding, and being."""

from __future__ import annotations

import errno
import io
import os
import socket
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memprop.errors import UsageError
from memprop.report.output import check_outputs, write_output, writes_to_stdout

TEXT = "{\"peak\": \"1.5 GiB · ünïcode\"}\n"
PNG = b"\x89PNG\r\n\x1a\n\x00binary\xff"


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _reader(fifo: Path) -> tuple[threading.Thread, list[bytes]]:
    got: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as stream:
            got.append(stream.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, got


# --- "-": standard output ---------------------------------------------------------------------


@pytest.mark.parametrize("dash", ["-", Path("-")])
def test_dash_writes_text_to_stdout_and_no_file(
    dash: str | Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert write_output(dash, TEXT) == "standard output"
    assert capsys.readouterr().out == TEXT
    assert os.listdir(tmp_path) == []


def test_dash_writes_bytes_to_stdout_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert write_output("-", PNG) == "standard output"
    assert capsysbinary.readouterr().out == PNG
    assert os.listdir(tmp_path) == []


def test_dash_sends_utf8_when_the_console_cannot_spell_the_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    console = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", console)
    write_output("-", TEXT)
    assert console.buffer.getvalue() == TEXT.encode("utf-8")


def test_dash_refuses_bytes_on_a_text_only_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(UsageError, match=r"binary data to standard output: .* file path"):
        write_output("-", PNG)


# --- symbolic links ---------------------------------------------------------------------------


@pytest.mark.parametrize("absolute", [False, True])
def test_a_link_stays_a_link_and_its_target_gets_the_content(
    tmp_path: Path, absolute: bool
) -> None:
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "report.json"
    target.write_text("old")
    link = tmp_path / "latest.json"
    pointer = str(target) if absolute else "data/report.json"
    link.symlink_to(pointer)
    assert write_output(link, TEXT) == str(link)
    assert link.is_symlink() and os.readlink(link) == pointer
    assert target.read_bytes() == TEXT.encode("utf-8")
    assert sorted(os.listdir(tmp_path / "data")) == ["report.json"]


def test_a_chain_of_two_links_writes_the_end_of_the_chain(tmp_path: Path) -> None:
    target = tmp_path / "target.json"
    target.write_text("old")
    middle, first = tmp_path / "middle.json", tmp_path / "first.json"
    middle.symlink_to("target.json")
    first.symlink_to("middle.json")
    write_output(first, TEXT)
    assert os.readlink(first) == "middle.json" and os.readlink(middle) == "target.json"
    assert target.read_text(encoding="utf-8") == TEXT
    assert sorted(os.listdir(tmp_path)) == ["first.json", "middle.json", "target.json"]


def test_a_dangling_link_creates_its_target(tmp_path: Path, umask: Callable[[int], int]) -> None:
    umask(0o022)
    link = tmp_path / "out.json"
    link.symlink_to("made/later/out.json")
    write_output(link, TEXT)
    assert link.is_symlink() and os.readlink(link) == "made/later/out.json"
    made = tmp_path / "made" / "later" / "out.json"
    assert made.read_text(encoding="utf-8") == TEXT
    assert stat.S_ISREG(os.lstat(made).st_mode) and _mode(made) == 0o644


# --- special files: written in place ----------------------------------------------------------


def test_a_fifo_receives_the_data_and_stays_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    thread, got = _reader(fifo)
    assert write_output(fifo, TEXT) == str(fifo)
    thread.join(timeout=10)
    assert got == [TEXT.encode("utf-8")]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["pipe"]


def test_a_link_to_a_fifo_writes_the_fifo(tmp_path: Path) -> None:
    fifo, link = tmp_path / "pipe", tmp_path / "link"
    os.mkfifo(fifo)
    link.symlink_to("pipe")
    thread, got = _reader(fifo)
    write_output(link, PNG)
    thread.join(timeout=10)
    assert got == [PNG]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.readlink(link) == "pipe"


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_dev_null_stays_a_character_device(tmp_path: Path) -> None:
    before = os.stat("/dev/null")
    assert write_output("/dev/null", TEXT) == "/dev/null"
    link = tmp_path / "discard.json"
    link.symlink_to("/dev/null")
    write_output(link, PNG)
    after = os.lstat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert os.readlink(link) == "/dev/null"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_dev_full_is_a_usage_error_and_stays_a_device() -> None:
    with pytest.raises(UsageError) as caught:
        write_output("/dev/full", TEXT)
    assert str(caught.value) == f"cannot write /dev/full: {os.strerror(errno.ENOSPC)}"
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


@pytest.mark.skipif(not os.path.islink("/dev/stdout"), reason="/dev/stdout is not a link here")
def test_dev_stdout_writes_descriptor_one_and_stays_a_link(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # capfd points descriptor 1 at a regular temporary file: the case where replacing the
    # file /proc/self/fd/1 resolves to would lose the data.
    pointer = os.readlink("/dev/stdout")
    print("before", flush=True)
    assert write_output("/dev/stdout", TEXT) == "/dev/stdout"
    print("after", flush=True)
    assert capfd.readouterr().out == "before\n" + TEXT + "after\n"
    assert os.readlink("/dev/stdout") == pointer


# --- regular files: replaced whole ------------------------------------------------------------


def test_a_replaced_file_keeps_its_mode_and_gets_the_content(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    path.write_text("old contents, longer than the new ones" * 10)
    path.chmod(0o640)
    old_inode = os.stat(path).st_ino
    assert write_output(path, TEXT) == str(path)
    assert path.read_bytes() == TEXT.encode("utf-8")
    assert _mode(path) == 0o640
    assert os.stat(path).st_ino != old_inode  # a new file renamed over, not rewritten in place
    assert os.listdir(tmp_path) == ["out.json"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_root_replacing_a_users_file_leaves_it_theirs(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    path.write_text("old")
    os.chown(path, 65534, 65534)
    path.chmod(0o604)
    write_output(path, TEXT)
    found = os.stat(path)
    assert (found.st_uid, found.st_gid, stat.S_IMODE(found.st_mode)) == (65534, 65534, 0o604)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_a_new_file_gets_the_umasks_mode(
    tmp_path: Path, umask: Callable[[int], int], mask: int, mode: int
) -> None:
    umask(mask)
    path = tmp_path / "new" / "deeper" / "out.png"
    assert write_output(str(path), PNG) == str(path)
    assert path.read_bytes() == PNG
    assert _mode(path) == mode
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert os.umask(mask) == mask  # the write left the umask as it found it


def test_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"^cannot write .*: it is a folder; give the path"):
        write_output(tmp_path, TEXT)
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_a_file_in_the_middle_of_the_path_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("mine")
    path = tmp_path / "file.txt" / "out.json"
    with pytest.raises(UsageError, match=r"^cannot write .*file\.txt/out\.json: "):
        write_output(path, TEXT)
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_a_name_at_the_length_limit_is_replaced_too(tmp_path: Path) -> None:
    path = tmp_path / ("r" * 250 + ".json")  # 255 bytes: the temporary name must be shorter
    path.write_text("old")
    write_output(path, TEXT)
    assert path.read_text(encoding="utf-8") == TEXT
    assert os.listdir(tmp_path) == [path.name]


def test_an_empty_path_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="empty"):
        write_output("", TEXT)


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_replace_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existed: bool
) -> None:
    path = tmp_path / "out.json"
    if existed:
        path.write_text("old")

    def fail(source: str, destination: str) -> None:
        raise OSError(errno.EIO, "simulated failure")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(UsageError) as caught:
        write_output(path, TEXT)
    assert str(caught.value) == f"cannot write {path}: simulated failure"
    assert os.listdir(tmp_path) == (["out.json"] if existed else [])
    if existed:
        assert path.read_text() == "old"


def test_an_interrupted_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(handle: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_output(tmp_path / "out.json", TEXT)
    assert os.listdir(tmp_path) == []


# --- check_outputs ----------------------------------------------------------------------------


def test_check_refuses_two_flags_on_one_file(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    with pytest.raises(UsageError) as caught:
        check_outputs({"--json": path, "--html": str(path)})
    assert str(caught.value) == f"--json and --html both name {path}: give each its own file"


def test_check_sees_through_dot_dot_and_links(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    path = tmp_path / "a.json"
    roundabout = tmp_path / "x" / ".." / "a.json"
    with pytest.raises(UsageError) as caught:
        check_outputs({"--json": path, "--trace": roundabout})
    assert str(caught.value) == (f"--json and --trace both name {path} (as {path} and "
                                 f"{roundabout}): give each its own file")
    link = tmp_path / "link.json"
    link.symlink_to("a.json")  # dangling: a.json does not exist yet
    with pytest.raises(UsageError, match=r"^--json and --html both name .*a\.json \(as "):
        check_outputs({"--json": path, "--html": link})
    path.write_text("{}")
    with pytest.raises(UsageError, match=r"^--html and --json both name .*a\.json \(as "):
        check_outputs({"--html": link, "--json": path})


def test_check_refuses_two_flags_on_stdout() -> None:
    with pytest.raises(UsageError) as caught:
        check_outputs({"--json": "-", "--html": None, "--trace": Path("-")})
    assert str(caught.value).startswith("--json and --trace both ask for standard output (-)")
    with pytest.raises(UsageError, match=r"^--a, --b and --c all ask for standard output"):
        check_outputs({"--a": "-", "--b": "-", "--c": "-"})


def test_check_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        check_outputs({"--json": tmp_path})
    assert str(caught.value) == f"--json {tmp_path} is a folder: give the path of a file to write"


def test_check_refuses_a_file_used_as_a_folder(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("mine")
    path = tmp_path / "file.txt" / "sub" / "out.json"
    with pytest.raises(UsageError) as caught:
        check_outputs({"--html": path})
    assert str(caught.value) == (f"--html {path}: {tmp_path / 'file.txt'} is a file, not a "
                                 "folder, so nothing can be made inside it: choose another path")


def test_check_refuses_an_empty_path() -> None:
    with pytest.raises(UsageError) as caught:
        check_outputs({"--json": None, "--html": ""})
    assert str(caught.value) == ("--html was given an empty path: give a file path, or - for "
                                 "standard output")


def test_check_refuses_a_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a socket's path is short: keep it relative
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("sock")
        with pytest.raises(UsageError) as caught:
            check_outputs({"--trace": "sock"})
    assert str(caught.value) == ("--trace sock is a socket, which cannot be opened as a file: "
                                 "give a file, a FIFO or - instead")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root may write anything")
def test_check_refuses_what_cannot_be_written(tmp_path: Path) -> None:
    locked = tmp_path / "locked.json"
    locked.write_text("{}")
    locked.chmod(0o444)
    with pytest.raises(UsageError, match=r"locked\.json exists and is not writable"):
        check_outputs({"--json": locked})
    folder = tmp_path / "shut"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UsageError, match=r"the folder .*shut is not writable"):
            check_outputs({"--json": folder / "new" / "out.json"})
    finally:
        folder.chmod(0o755)


def test_check_refuses_what_access_denies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same refusals as above, for a root run too: os.access says no for the chosen paths.
    denied = {str(tmp_path / "locked.json"), str(tmp_path / "shut")}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) not in denied and real_access(p, mode))
    (tmp_path / "locked.json").write_text("{}")
    (tmp_path / "shut").mkdir()
    (tmp_path / "shut" / "old.json").write_text("{}")
    with pytest.raises(UsageError) as caught:
        check_outputs({"--json": tmp_path / "locked.json"})
    assert str(caught.value) == (f"--json {tmp_path / 'locked.json'} exists and is not "
                                 "writable: change its permissions or choose another path")
    with pytest.raises(UsageError) as caught:
        check_outputs({"--html": tmp_path / "shut" / "new" / "r.html"})
    assert str(caught.value) == (f"--html {tmp_path / 'shut' / 'new' / 'r.html'}: cannot create "
                                 f"it, the folder {tmp_path / 'shut'} is not writable: choose a "
                                 "folder you can write to")
    with pytest.raises(UsageError) as caught:
        check_outputs({"--trace": tmp_path / "shut" / "old.json"})
    assert str(caught.value) == (f"--trace {tmp_path / 'shut' / 'old.json'}: its folder "
                                 f"{tmp_path / 'shut'} is not writable, and the new file is "
                                 "made beside the old one: choose another path")


def test_check_passes_devices_fifos_new_paths_and_none(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    outputs: dict[str, str | Path | None] = {
        "--json": fifo, "--html": tmp_path / "new" / "deep" / "r.html", "--trace": "-",
        "--plot": None, "--md": tmp_path / "new" / "deep" / "r.md",
    }
    if os.path.exists("/dev/null"):
        outputs["--csv"] = "/dev/null"
    # In a thread, so that an implementation that opens the FIFO fails here instead of hanging.
    done: list[bool] = []

    def check() -> None:
        check_outputs(outputs)
        done.append(True)

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # unblock it: a reader lets the stuck open() return
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    assert done == [True]
    assert sorted(os.listdir(tmp_path)) == ["pipe"]  # the check creates nothing
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_writes_to_stdout() -> None:
    assert writes_to_stdout({"--json": "out.json", "--trace": "-", "--html": None})
    assert writes_to_stdout({"--json": Path("-")})
    assert not writes_to_stdout({"--json": "out.json", "--html": None, "--trace": "./-"})
    assert not writes_to_stdout({})
