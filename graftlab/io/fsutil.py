"""Durable file replacement: write under a temporary name, fsync, rename, fsync the directory.

A rename is atomic but not durable by itself: after a power loss or a kernel crash the new name can
point at a file whose data never reached the disk (a zero-length or torn file), or the rename itself
can be lost. Every writer that replaces a user's file calls these, so a crash leaves either the old
file or the complete new one::

    with atomic_path("run/metrics.parquet") as tmp:      # a hidden name beside the target
        pq.write_table(table, tmp)                        # any writer that takes a path
    atomic_write("run/corrections.json", text)           # or bytes / str in one call

Temporary names are hidden, unique and random (``.name.<16 hex>.tmp``), created with ``O_EXCL |
O_NOFOLLOW``: a file or symbolic link planted at a predictable name is never written through. The
writer holds an ``flock`` on its temporary file while it writes; the next writer of the same target
deletes the temporaries nobody holds (a SIGKILLed writer's), and only names of that exact pattern.

On platforms without directory fsync (Windows) the directory step is skipped.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from graftlab.errors import GraftlabError

try:  # POSIX; elsewhere a temporary file is never known to be abandoned and stays
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

PathLike = Union[str, os.PathLike]

# what follows the target's name in its temporary's: 16 random hex digits, then .tmp
_TEMP_TAIL = r"\.[0-9a-f]{16}\.tmp"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def temporary_name(path: PathLike) -> Path:
    """A fresh hidden name ``path`` may be written under before the rename: ``.name.<16 hex>.tmp``
    beside it (random: never one an earlier run or another user could have prepared).

    Hidden (a leading dot) so that directory readers (``pandas.read_parquet``, globs) never see a
    half-written file. Nothing is created; :func:`create_temporary` creates one safely.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def temporary_pattern(name_regex: str) -> "re.Pattern[str]":
    """The names of graftlab's temporaries of the targets whose names match ``name_regex``."""
    return re.compile(rf"\.(?:{name_regex}){_TEMP_TAIL}")


def create_temporary(path: PathLike) -> tuple[Path, int]:
    """Create an empty hidden temporary file beside ``path`` (``O_CREAT | O_EXCL | O_NOFOLLOW``,
    mode ``0o666`` less the umask, as ``open()`` creates files); returns its name and an open
    descriptor holding an exclusive ``flock`` on it (close it when the file is renamed or removed:
    until then :func:`clean_temporaries` knows it is in use)."""
    while True:
        tmp = temporary_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        except FileExistsError:
            continue
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else can hold it
        return tmp, fd


def clean_temporaries(directory: PathLike, name_regex: str) -> list[str]:
    """Delete the temporaries graftlab left in ``directory`` for targets matching ``name_regex``
    (a SIGKILLed writer's): only regular files named by :func:`temporary_name`'s pattern whose
    ``flock`` no live writer holds. Returns the names deleted; never raises for a file it cannot
    inspect (it is left as it is)."""
    if fcntl is None:
        return []
    pattern = temporary_pattern(name_regex)
    try:
        names = [n for n in os.listdir(directory) if pattern.fullmatch(n)]
    except OSError:
        return []
    removed = []
    for name in names:
        p = os.path.join(directory, name)
        try:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            fd = os.open(p, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.lstat(p).st_ino:  # still the file we locked
                os.unlink(p)
                removed.append(name)
        except OSError:
            pass  # a live writer holds it, or it went away meanwhile
        finally:
            os.close(fd)
    return removed


def file_kind(mode: int) -> str:
    """A file type in words, for messages (``'a FIFO'``, ``'a device'``)."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def check_regular(path: PathLike, what: str = "file") -> None:
    """GraftlabError unless ``path`` is a regular file (symbolic links followed), checked without
    opening it: opening a FIFO named like an input would wait forever for a writer, and a device
    would be read as data. A missing path passes (the caller says it is missing in its own words)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except (OSError, ValueError) as err:
        raise GraftlabError(f"{what} {os.fspath(path)!r}: {describe_os_error(err)}") from None
    if not stat.S_ISREG(mode):
        raise GraftlabError(f"{what} {os.fspath(path)!r} is {file_kind(mode)}, not a regular file; not reading it")


def describe_os_error(err: BaseException) -> str:
    """One line for an operating-system error, without the path (the caller names it)."""
    if isinstance(err, ValueError) and "null" in str(err):
        return "a path cannot hold a NUL byte"
    if isinstance(err, OSError):
        if err.errno == errno.ENOSPC:
            return "no space left on the device"
        if err.errno == errno.ENAMETOOLONG:
            return "file name too long"
        if err.errno == errno.ELOOP:
            return "too many levels of symbolic links"
        return err.strerror or str(err)
    return str(err)

def fsync_file(path: PathLike) -> None:
    """Flush ``path``'s data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: PathLike) -> None:
    """Flush a directory's entries (a rename or a new file inside it) to the disk."""
    if os.name == "nt":  # directories cannot be opened for fsync there; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: PathLike, path: PathLike) -> Path:
    """Rename the complete file ``tmp`` to ``path`` so that both its data and the rename survive a crash.

    ``tmp`` is fsynced first (its data is on disk before any name points at it), then renamed over
    ``path`` (atomic: readers see the old or the new file), then the directory is fsynced (the rename
    itself is on disk). Returns ``path``.
    """
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise GraftlabError(f"{str(path)!r} is {file_kind(mode)}; not replacing it with a file")
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_directory(path.parent if str(path.parent) else Path("."))
    return path


def remove_durably(path: PathLike) -> None:
    """Delete ``path`` and fsync its directory, so the removal is not undone by a crash."""
    path = Path(path)
    os.unlink(path)
    fsync_directory(path.parent if str(path.parent) else Path("."))


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield the temporary name to write ``path`` under; on a clean exit it replaces ``path`` durably.

    The temporary file exists (empty, created safely by :func:`create_temporary`) when yielded; a
    writer that takes a path opens it by name. Temporaries a killed writer of ``path`` left beside
    it are deleted first. On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    clean_temporaries(path.parent if str(path.parent) else ".", re.escape(path.name))
    tmp, fd = create_temporary(path)
    try:
        yield tmp
        replace_durably(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(fd)


def atomic_write(path: PathLike, data: Union[bytes, str], encoding: str = "utf-8") -> Path:
    """Write ``data`` (bytes, or str in ``encoding``) to ``path`` atomically and durably."""
    raw = data.encode(encoding) if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(raw)
    return Path(path)
