"""Opening a trace folder for a :class:`~graftlab.Recorder`: every check first, then the lock, then
(and only then) replacing or truncating the old trace, whose files wait aside until the new run's
first part is durable (:mod:`graftlab.trace.replacing`: put back if the run fails before it).

    lock, meta = open_trace(path, meta, group_names, start_step=0, every=1, overwrite=False, resume=False)

What it refuses, before anything in ``path`` changes:

- ``path`` is a file (a trace is a folder: a user's file never becomes one), lies inside another
  trace folder, is a folder of other files, or exists without ``overwrite``/``resume``;
- ``path`` holds a user's entry named like a part (a copy, a folder, a link:
  :func:`~graftlab.trace.outputs.check_stray_parts`), which would stay beside the new parts;
- another process is writing ``path`` (:class:`~graftlab.trace.lock.TraceLock`);
- ``resume`` would drop every recorded step (a fresh optimizer at step 0: load its checkpoint
  first), would leave a gap (the trace ends before the step the run resumes at), or continues a
  trace recorded with other groups or another run (seed, task, batch size, every, optimizers).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from graftlab import trace
from graftlab.errors import GraftlabError, OutputExistsError
from graftlab.trace.outputs import check_kind, check_stray_parts, trace_folder_of
from graftlab.trace import replacing
from graftlab.trace.lock import LOCK_NAME, TraceLock

# Metadata that makes a resumed run another run than the one the trace holds.
IDENTITY = ("task", "seed", "batch_size", "every", "granularity")


def open_trace(
    path: Path,
    meta: dict[str, Any],
    group_names: Sequence[str],
    *,
    start_step: int,
    every: int,
    overwrite: bool,
    resume: bool,
) -> tuple[TraceLock, dict[str, Any]]:
    """Lock ``path`` and make it ready to record from ``start_step``; returns the held lock and the
    metadata every part gets (a resumed trace keeps its own). Raises :class:`GraftlabError`
    (:class:`OutputExistsError` for an existing trace without ``overwrite``/``resume``)."""
    path = Path(path)
    check_kind(path, "trace")  # a link: replacing or resuming through it would change the trace it points to
    if path.exists() and not path.is_dir():
        raise GraftlabError(f"{path} exists and is a file, not a trace folder; choose another path")
    outer = trace_folder_of(path.parent)
    if outer is not None:
        raise GraftlabError(f"{path} is inside the trace folder {outer}, which holds only trace parts")
    if path.is_dir() and replacing.active(path):
        # a writer killed while replacing this trace left the old files aside: put them back (or
        # drop them, when its first part made it to disk) before anything is decided about path
        with TraceLock(path):
            replacing.recover(path)
    _check_folder(path, overwrite, resume)
    created = not path.exists()
    lock = TraceLock(path)
    try:
        lock.acquire()
        # a writer killed while replacing this trace left the old files aside: settle that first
        replacing.recover(path)
        trace.clean_trace_temporaries(path)
        _check_folder(path, overwrite, resume)  # again, now that no other writer can change it
        meta = _prepare(path, meta, group_names, start_step, every, overwrite, resume)
        replacing.seal(path)
    except BaseException:
        held = lock.held
        try:
            if held:
                replacing.restore(path)  # the old trace back, as it was
                if lock.created_file:
                    (path / LOCK_NAME).unlink(missing_ok=True)
        finally:
            lock.release()
        if created and held:  # a failed open leaves no folder behind (never the lock of a writer that won)
            (path / LOCK_NAME).unlink(missing_ok=True)
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise
    return lock, meta


def first_part_written(path: Path) -> None:
    """Called once the run's first part is durable: the old files kept aside go."""
    replacing.discard(path)


def release_trace(path: Path, lock: TraceLock, created: bool) -> None:
    """Release the trace ``path`` a Recorder opened (``lock``). A run that got no part to disk
    leaves the folder as it found it: a trace it was replacing or resuming comes back whole
    (:mod:`graftlab.trace.replacing`); a new one is removed (its sidecar and lock file, and the
    folder itself when the Recorder created it ``created``). A user's folder is kept, as it was;
    ``graftlab info`` would otherwise find a trace of no steps, and the next Recorder on ``path``
    an existing trace to refuse."""
    try:
        if lock.held and path.is_dir() and replacing.active(path):
            replacing.restore(path)
            if lock.created_file:
                (path / LOCK_NAME).unlink(missing_ok=True)
        elif lock.held and path.is_dir() and not trace.part_files(path):
            (path / trace.SIDECAR).unlink(missing_ok=True)
            (path / LOCK_NAME).unlink(missing_ok=True)  # while held: no other writer is in between
    finally:
        lock.release()
    if created and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _check_folder(path: Path, overwrite: bool, resume: bool) -> None:
    if not path.is_dir():
        return
    entries = [p for p in path.iterdir() if p.name not in (LOCK_NAME, replacing.BACKUP)]
    if not entries and not (path / replacing.BACKUP).exists():
        return
    if entries and not trace.is_trace(path):
        raise GraftlabError(f"{path} is a directory that does not hold a graftlab trace; not "
                            f"{'resuming' if resume else 'replacing'} it")
    check_stray_parts(path)  # a user's file would stay beside the new parts: said before any step (and overwrite)
    if not (overwrite or resume):
        raise OutputExistsError(path, "trace")


def _prepare(path: Path, meta: dict[str, Any], group_names: Sequence[str], start: int, every: int,
             overwrite: bool, resume: bool) -> dict[str, Any]:
    has_parts = path.is_dir() and bool(trace.part_files(path))
    if resume and has_parts:
        old = _old_metadata(path)
        _check_same_run(path, old, meta, group_names)
        extent = _extent(path)
        if extent is not None and not _check_resume_step(path, extent, start, every, overwrite):
            trace.prepare_directory(path, overwrite=True)  # resume at step 0 with overwrite: start over
            trace.write_sidecar(path, meta)
            return meta
        trace.truncate(path, start)
        return _extended(path, old, meta)
    trace.prepare_directory(path, overwrite=overwrite or resume, resume=False)
    trace.write_sidecar(path, meta)
    return meta


def _extended(path: Path, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The resumed trace's metadata with the resuming run's length: ``config.steps`` (what ``graftlab
    info`` shows as the run's steps) is the run's now, not the first process's; the sidecar is rewritten."""
    steps = (new.get("config") or {}).get("steps") if isinstance(new.get("config"), dict) else None
    config = old.get("config")
    if steps is None or not isinstance(config, dict) or config.get("steps") == steps or not (path / trace.SIDECAR).exists():
        return old
    old = {**old, "config": {**config, "steps": steps}}
    replacing.begin(path)  # the old sidecar is kept until the first new part, like the parts
    replacing.stash(path, trace.SIDECAR)
    trace.write_sidecar(path, old)
    return old


def _old_metadata(path: Path) -> dict[str, Any]:
    try:
        return trace.read_metadata(path)
    except GraftlabError:
        pass
    try:
        return json.loads((path / trace.SIDECAR).read_text())
    except (OSError, ValueError) as err:
        raise GraftlabError(f"{path}: cannot resume, unreadable metadata ({err})") from None


def _extent(path: Path) -> Optional[tuple[int, int]]:
    try:
        return trace.trace_extent(path)
    except GraftlabError as err:
        if "empty" in str(err):
            return None
        raise GraftlabError(f"{path}: cannot resume, {err}") from None


def _check_same_run(path: Path, old: dict[str, Any], new: dict[str, Any], group_names: Sequence[str]) -> None:
    names = [g.get("name") for g in old.get("groups") or [] if isinstance(g, dict)]
    if names != list(group_names):
        raise GraftlabError(f"{path}: cannot resume, the trace was recorded with different groups")
    for key in IDENTITY:
        a, b = old.get(key), new.get(key)
        if a is not None and b is not None and a != b:
            raise GraftlabError(f"{path}: cannot resume, the trace was recorded with {{{key}={a!r}}} and this run "
                                f"has {{{key}={b!r}}}; record another trace (or pass {{overwrite=True}} to replace it)",
                                param=("overwrite", key))
    for role in ("magnitude", "direction"):
        a, b = (old.get(role) or {}).get("class"), (new.get(role) or {}).get("class")
        if a and b and a != b:
            raise GraftlabError(f"{path}: cannot resume, the trace's {role} optimizer is {a} and this run's is {b}")


def _check_resume_step(path: Path, extent: tuple[int, int], start: int, every: int, overwrite: bool) -> bool:
    """True when the run may continue the trace at ``start``; False to start over (``overwrite``)."""
    first, last = extent
    if start <= first:
        if overwrite:
            return False
        raise GraftlabError(
            f"{path}: resuming at step {start} would drop every recorded step ({first}..{last}); load the "
            "optimizer's checkpoint first (a fresh Graft is at step 0), or pass {overwrite=True} to record from "
            "scratch", param="overwrite")
    next_recorded = math.ceil(start / every) * every
    if next_recorded > last + every:
        raise GraftlabError(
            f"{path}: the trace ends at step {last} but the run resumes at step {start}: steps {last + 1}.."
            f"{start - 1} would be missing for good; resume from a checkpoint at or before step {last + 1} "
            "(graftlab's checkpoints flush the Recorder; call Recorder.sync() before saving your own)"
        )
    return True
