"""Durable file replacement: write under a temporary name, fsync, rename, fsync the directory.

A rename is atomic but not durable by itself: after a power loss or a kernel crash the new name can
point at a file whose data never reached the disk (a zero-length or torn file), or the rename itself
can be lost. Every writer that replaces a user's file calls these, so a crash leaves either the old
file or the complete new one::

    with atomic_path("run/metrics.parquet") as tmp:      # a hidden name beside the target
        pq.write_table(table, tmp)                        # any writer that takes a path
    atomic_write("run/corrections.json", text)           # or bytes / str in one call

On platforms without directory fsync (Windows) the directory step is skipped.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def temporary_name(path: PathLike) -> Path:
    """The hidden name ``path`` is written under before the rename (``.name.tmp`` beside it).

    Hidden (a leading dot) so that directory readers (``pandas.read_parquet``, globs) never see a
    half-written file.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


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

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        replace_durably(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def atomic_write(path: PathLike, data: Union[bytes, str], encoding: str = "utf-8") -> Path:
    """Write ``data`` (bytes, or str in ``encoding``) to ``path`` atomically and durably."""
    raw = data.encode(encoding) if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(raw)
    return Path(path)
