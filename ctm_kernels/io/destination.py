"""Where an output goes: the checks (:func:`check_output`: never over, inside or around an
input; over an existing path only with ``overwrite`` and only when ctm wrote it, which the
format recognises) and the atomic writes (a temporary folder or file next to the output,
renamed into place when complete, removed otherwise)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def check_destination(dest: Path, overwrite: bool) -> None:
    """What every output's path needs, whoever writes it: an existing ``dest`` needs
    ``overwrite``, a missing one an existing parent folder."""
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise ValueError(f"{dest}: already exists (pass overwrite=True / --overwrite to replace a previous "
                             "ctm output)")
    elif not dest.parent.is_dir():
        raise ValueError(f"{dest.parent}: no such directory for the output")


def check_output(dest: Path, fmt, sources: list[Path], overwrite: bool) -> None:
    """Raise ``ValueError`` unless the merge may write ``dest`` in the format ``fmt`` (an
    :class:`~.formats.OutputFormat`): not an input, not inside an input, not holding one; then
    :func:`check_destination`, write permission next to it, and an existing ``dest`` must be a
    previous ctm output of the same format."""
    here = dest.resolve()
    for src in sources:
        there = src.resolve()
        if here == there:
            raise ValueError(f"{dest}: is the input {src}; the merge never writes over an input")
        if there in here.parents:
            raise ValueError(f"{dest}: lies inside the input {src}; write the merge elsewhere")
        if here in there.parents:
            raise ValueError(f"{dest}: holds the input {src}; write the merge elsewhere")
    check_destination(dest, overwrite)
    _check_writable(dest.parent)
    if not (dest.exists() or dest.is_symlink()):
        return
    if dest.is_symlink():
        raise ValueError(f"{dest}: is a symbolic link; overwrite replaces only a previous ctm output")
    fmt.check_previous(dest)


def _check_writable(folder: Path) -> None:
    """The output is written to a temporary entry in ``folder`` and renamed: both need write
    and search permission there (what the dry run can see; a read-only filesystem too)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{folder}: no permission to write the output there (the merge writes a temporary "
                         "output next to OUT and renames it)")


def _umask() -> int:
    """The process's umask (read by setting it, so set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Temporary outputs are named ``.OUT.tmp-ctm<pid>.<start>.<host>-XXXXXXXX``: the process that
# owns one (its id, its start time since boot, a hash of the host name), so that a later run
# can tell one left by a killed process (SIGKILL, power loss) from one still being written.
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-ctm(?P<pid>\d+)\.(?P<start>\d+)\.(?P<host>[0-9a-f]{8})-[a-z0-9_]{8}$")


def _start_time(pid: int) -> int:
    """A process's start time (clock ticks since boot, from /proc), or 0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_prefix(dest: Path) -> str:
    pid = os.getpid()
    return f".{dest.name}.tmp-ctm{pid}.{_start_time(pid)}.{_host()}-"


def _owner_alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                   # exists, another user's
    return start == 0 or _start_time(pid) in (0, start)


def remove_stale_temporaries(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporary outputs of ``dest`` (next to it, named as this module names them)
    whose process is gone on this host; returns what was removed. Anything else is left alone:
    other names, other hosts' temporaries, ones whose process still runs, folders holding a
    folder or a link."""
    dest = Path(dest)
    removed = []
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        m = _TMP.match(entry.name)
        if m is None or m["name"] != dest.name or m["host"] != host:
            continue
        if _owner_alive(int(m["pid"]), int(m["start"])):
            continue
        try:
            if entry.is_symlink():
                continue
            if entry.is_dir():
                children = list(entry.iterdir())
                if any(c.is_symlink() or not c.is_file() for c in children):
                    continue
                for c in children:
                    c.unlink()
                entry.rmdir()
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


@contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``dest``; on success rename it to ``dest``.

    On any failure the temporary folder is removed and ``dest`` is untouched: there is
    never a half-written output. With ``overwrite``, an existing ``dest`` is replaced only
    after the new folder is complete."""
    dest = Path(dest)
    check_destination(dest, overwrite)
    remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dest), dir=dest.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())          # mkdtemp makes it private (0700)
        yield tmp
        if dest.exists() or dest.is_symlink():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(old, dest)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``dest``; on success move it onto ``dest``."""
    dest = Path(dest)
    check_destination(dest, overwrite)
    if dest.is_dir():
        raise ValueError(f"{dest}: is a directory, expected a file path")
    remove_stale_temporaries(dest)
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(dest), dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())          # mkstemp makes it private (0600)
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
