"""One writer per trace: an exclusive ``flock`` on a hidden file inside the trace directory.

    with TraceLock(path):          # GraftlabError at once if another process is writing path
        ...                        # delete, truncate or append parts

The lock is taken before anything in the directory is deleted or truncated and held until the
writer is closed. The kernel drops it when the process dies (even by SIGKILL), so a killed run never
leaves a stale lock behind; the file itself stays (hidden: ``pandas.read_parquet`` and the part
glob skip it). Two runs recording into one folder would otherwise interleave their rows without
either noticing.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional, Union

from graftlab.errors import GraftlabError

LOCK_NAME = ".graftlab.lock"

try:  # POSIX; elsewhere the lock is a no-op and concurrent writers are not detected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def lock_path(directory: Union[str, os.PathLike]) -> Path:
    return Path(directory) / LOCK_NAME


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _open_lock_file(path: Path, flags: int) -> int:
    """A descriptor on the lock file ``path``, never through a symbolic link (``O_NOFOLLOW``) and
    only on a regular file (a FIFO planted there is not waited on: ``O_NONBLOCK``)."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise GraftlabError(f"{path} is a symbolic link; the trace lock is never taken through one: "
                                "remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise GraftlabError(f"{path} is not a regular file; the trace lock cannot be taken: remove it")
    return fd


def _holder(path: Path) -> str:
    try:
        fd = _open_lock_file(path, os.O_RDONLY)
    except (OSError, GraftlabError):
        return ""
    try:
        pid = os.read(fd, 32).decode(errors="replace").strip()
    except OSError:
        pid = ""
    finally:
        os.close(fd)
    return f" (pid {pid})" if pid.isdigit() else ""


class TraceLock:
    """An exclusive, non-blocking lock on the trace directory ``directory`` (created if missing).

    Raises :class:`~graftlab.errors.GraftlabError` when another process holds it. Re-entrant use
    from one object is an error; :meth:`release` is safe to call twice.
    """

    def __init__(self, directory: Union[str, os.PathLike]) -> None:
        self.directory = Path(directory)
        self._fd: Optional[int] = None
        self.created_file = False  # whether acquire() created the lock file

    def acquire(self) -> "TraceLock":
        if self._fd is not None:
            raise GraftlabError(f"{self.directory}: the trace lock is already held by this writer")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = lock_path(self.directory)
        try:  # whether this writer made the file: a writer that leaves the folder as it found it removes it
            fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            self.created_file = True
        except FileExistsError:
            fd = _open_lock_file(path, os.O_RDWR)
            self.created_file = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    raise GraftlabError(
                        f"{self.directory} is being written by another process{_holder(path)}; "
                        "wait for it to finish or write to another folder"
                    ) from None
                raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "TraceLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def writer(directory: Union[str, os.PathLike]) -> Optional[str]:
    """The pid (as text; ``""`` when unknown) of the live process writing the trace ``directory``,
    or None when no process holds its lock. Nothing is created or locked for longer than the test."""
    path = lock_path(directory)
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = _open_lock_file(path, os.O_RDONLY)
    except (OSError, GraftlabError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        pid = _holder(path)
        return pid[len(" (pid "):-1] if pid else ""
    finally:
        os.close(fd)  # a shared lock taken here goes with the descriptor
    return None


def check_unlocked(directory: Union[str, os.PathLike]) -> None:
    """GraftlabError if another process is writing the trace ``directory`` (nothing is created)."""
    pid = writer(directory)
    if pid is not None:
        raise GraftlabError(
            f"{Path(directory)} is being written by another process{f' (pid {pid})' if pid else ''}; "
            "wait for it to finish or write to another folder"
        )
