"""Nothing of a trace is destroyed before its replacement exists.

Recording over a trace (``overwrite``) or cutting it back to resume (``truncate``) moves each file
it would delete or rewrite into a hidden folder inside the trace, :data:`BACKUP`, by a rename (no
copy). The old files come back when the new run fails before its first part is on disk
(:func:`restore`), and go when that part is durable (:func:`discard`)::

    begin(T)                 # the backup folder and the list of T's own files before any change
    stash(T, "part-...")     # moved aside, each file once
    seal(T)                  # the preparation is complete: the part names T holds now
    ... the first new part written and fsynced ...
    discard(T)               # or, on failure before it: restore(T)

A writer killed in between leaves the folder behind; the next writer of the trace (holding its
lock) calls :func:`recover`, which restores the old files unless a new part made it to disk.
Readers skip the folder (hidden: ``pandas.read_parquet``, pyarrow datasets and the part glob
ignore it). Only the trace's own files are ever moved (:func:`~graftlab.trace.layout.trace_owned`).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Optional

from graftlab.errors import GraftlabError
from graftlab.io.fsutil import atomic_write, fsync_directory
from graftlab.trace.layout import BACKUP, PART_NAME, SIDECAR, PathLike
_ORIGINAL = ".original.json"  # T's own files when the backup began
_SEALED = ".prepared.json"  # the part names T held when the preparation ended


def _folder(directory: PathLike) -> Optional[Path]:
    """The backup folder of ``directory`` if there is one; GraftlabError if something other than a
    folder (a symbolic link, a file) holds its name: nothing is moved through it."""
    b = Path(directory) / BACKUP
    try:
        mode = os.lstat(b).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(mode):
        raise GraftlabError(f"{b} is not a folder graftlab made (a symbolic link or a file); remove it")
    return b


def _own(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if _restorable(n) and _is_file(directory / n))


def _restorable(name: str) -> bool:
    return PART_NAME.fullmatch(name) is not None or name == SIDECAR


def _is_file(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except OSError:
        return False


def _parts(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if PART_NAME.fullmatch(n) and _is_file(directory / n))


def active(directory: PathLike) -> bool:
    """Whether ``directory`` holds a backup (a run replacing it has not written its first part)."""
    return _folder(directory) is not None


def begin(directory: PathLike) -> None:
    """Start keeping ``directory``'s files aside (idempotent while a backup is open)."""
    directory = Path(directory)
    if _folder(directory) is not None:
        return
    b = directory / BACKUP
    os.mkdir(b, 0o755)
    atomic_write(b / _ORIGINAL, json.dumps(_own(directory)))
    fsync_directory(directory)


def stash(directory: PathLike, name: str) -> None:
    """Move ``directory/name`` (one of the trace's own files) into the backup, unless the backup
    already holds an older version of it (then the current one, written by this preparation, goes)."""
    directory = Path(directory)
    b = _folder(directory)
    if b is None:
        raise GraftlabError(f"{directory}: no backup begun")  # a programming error, said plainly
    if not _restorable(name):
        raise GraftlabError(f"{directory / name}: not a file of the trace; not moving it")
    if (b / name).exists():
        os.unlink(directory / name)
    else:
        os.rename(directory / name, b / name)
        fsync_directory(b)
    fsync_directory(directory)


def seal(directory: PathLike) -> None:
    """Mark the preparation complete: from here a new part name means the new run wrote one."""
    directory = Path(directory)
    b = _folder(directory)
    if b is not None:
        atomic_write(b / _SEALED, json.dumps(_parts(directory)))


def discard(directory: PathLike) -> None:
    """Delete the backup: the new run's first part is durable."""
    directory = Path(directory)
    b = _folder(directory)
    if b is not None:
        shutil.rmtree(b)  # a folder graftlab made; rmtree never follows a link inside it
        fsync_directory(directory)


def restore(directory: PathLike) -> None:
    """Put the old trace back: the files the preparation or the run created go, the stashed ones
    return under their names, and the backup is removed."""
    directory = Path(directory)
    b = _folder(directory)
    if b is None:
        return
    try:
        original = set(json.loads((b / _ORIGINAL).read_text()))
    except (OSError, ValueError):
        original = None  # killed while beginning: nothing was moved or written yet
    saved = [n for n in os.listdir(b) if _restorable(n) and _is_file(b / n)]
    if original is not None:
        for name in _own(directory):
            if name not in original and name not in saved:
                os.unlink(directory / name)
    for name in saved:
        os.replace(b / name, directory / name)
    fsync_directory(directory)
    shutil.rmtree(b)
    fsync_directory(directory)


def recover(directory: PathLike) -> Optional[str]:
    """Settle a backup a killed writer left (call it holding the trace's lock): restore the old
    files when the new run got no part to disk, else delete them. Returns what was done."""
    directory = Path(directory)
    b = _folder(directory)
    if b is None:
        return None
    try:
        sealed = json.loads((b / _SEALED).read_text())
    except (OSError, ValueError):
        sealed = None
    if sealed is not None and _parts(directory) != sealed:
        discard(directory)
        return "discarded"
    restore(directory)
    return "restored"
