"""What a checkpoint folder is trusted for, and what is checked before trusting it.

A checkpoint saved by :func:`~graftlab.distributed.save_checkpoint` is a folder of
``torch.distributed.checkpoint`` files and ``graftlab.json``. DCP's ``.metadata`` is a pickle:
loading it runs whatever code it holds. So graftlab records a SHA-256 of every file it saved in
``graftlab.json`` and loads a checkpoint only when they all still match (:func:`verify`): a file
replaced or crafted after the save is refused before anything is unpickled. The digests live in
the same folder, so this guards against files changed or planted there, not against someone who
can rewrite the whole folder: load only checkpoint folders you would run code from.

Each checkpoint also names its run: a run id (letters and digits, checked before it becomes part
of a folder name) and the run's identity settings (:func:`run_identity`: task, seed, optimizers,
trace, ...), compared when a run resumes (:func:`check_same_run`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional, Union

from graftlab.errors import GraftlabError

try:  # POSIX; elsewhere a killed save's folder is never known to be abandoned and stays
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
from graftlab.io.fsutil import describe_os_error, fsync_directory

CHECKPOINT_META = "graftlab.json"
PathLike = Union[str, os.PathLike]

# a run id as graftlab draws it (and older checkpoints' "v0"); any other text read from disk is no
# run id: it becomes part of a folder name ("/../../X" would leave the checkpoint folder)
RUN_ID = re.compile(r"[0-9A-Za-z]{1,64}")
_SAFE_FILE = re.compile(r"[0-9A-Za-z_.-]{1,200}")


def saved_extra(path: Path) -> dict:
    """The ``extra`` a checkpoint was saved with (its step, run id and identity); {} where unreadable."""
    try:
        extra = json.loads((path / CHECKPOINT_META).read_text()).get("extra")
    except (OSError, ValueError, AttributeError):
        return {}
    return extra if isinstance(extra, dict) else {}


def reason(err: BaseException) -> str:
    """One line for a failed save or load: DCP wraps a full disk as "unexpected pos" inside its
    own exception; the operating system's reason is what a user can act on."""
    seen: set[int] = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return describe_os_error(e)
        failures = getattr(e, "failures", None)  # torch's CheckpointException: {rank: exception}
        if isinstance(failures, dict):  # {rank: exception} or {rank: (exception, stack)}
            for f in failures.values():
                f = f[0] if isinstance(f, tuple) and f else f
                if isinstance(f, BaseException):
                    return reason(f)
        e = e.__cause__ or e.__context__
    text = " ".join(str(err).split())
    if "unexpected pos" in text:
        return "the file could not be written whole: no space left on the device?"
    return text[:300] or type(err).__name__


def put_in_place(tmp: Path, path: Path) -> None:
    """Rename the complete checkpoint ``tmp`` to ``path``; an old one there is moved aside first and
    deleted after."""
    old = None
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_dir():
            raise GraftlabError(f"{path} is not a checkpoint folder; not replacing it")
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:16]}.old")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    fsync_directory(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def digests(path: Path) -> dict[str, str]:
    """SHA-256 of every file DCP wrote into ``path`` (its ``.metadata`` is a pickle: loading runs
    whatever code it holds, so a checkpoint is loaded only when these still match)."""
    out = {}
    for name in sorted(os.listdir(path)):
        p = path / name
        if name != CHECKPOINT_META and p.is_file() and not p.is_symlink():
            out[name] = _sha256(p)
    return out


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, meta: dict) -> None:
    """GraftlabError unless every file of the checkpoint is the one saved (digests in graftlab.json)."""
    digests = meta.get("digests")
    if not isinstance(digests, dict) or ".metadata" not in digests:
        raise GraftlabError(
            f"{path}: the checkpoint records no digest of its files (saved by an older graftlab, or not by "
            "graftlab): its .metadata is a pickle that runs any code it holds when loaded, so it is not loaded")
    for name, want in digests.items():
        if not (isinstance(name, str) and _SAFE_FILE.fullmatch(name) and name not in (".", "..")
                and isinstance(want, str)):
            raise GraftlabError(f"{path}: {CHECKPOINT_META} names a file {name!r} graftlab does not write")
        p = path / name
        if p.is_symlink() or not p.is_file():
            raise GraftlabError(f"{path}: the checkpoint's file {name} is missing (an incomplete or damaged "
                                "checkpoint; no shards to load)")
        if _sha256(p) != want:
            raise GraftlabError(f"{path}: the checkpoint's file {name} is not the one saved (its digest "
                                "differs); not loading it")


# The settings that make a run another run: a checkpoint saved by a run with other values is not
# this run's (same settings and another seed give other rows; another trace is another recording).
IDENTITY = ("task", "size", "data", "seed", "batch_size", "magnitude", "direction", "magnitude_lr", "direction_lr",
            "m_hparams", "d_hparams", "granularity", "every", "out", "optimizer", "lr", "hparams", "corrections")
_PATHS = ("data", "out", "corrections")


def run_identity(config: Any) -> dict[str, Any]:
    """What ties a checkpoint to its run (and a recording's checkpoint to its trace): the identity
    settings ``config`` has (:data:`IDENTITY`), paths made absolute. Saved with every checkpoint of
    a run (``extra["identity"]``) and compared on resume (:func:`check_same_run`)."""
    out: dict[str, Any] = {}
    for key in IDENTITY:
        if not hasattr(config, key):
            continue
        value = getattr(config, key)
        if key in _PATHS and value is not None:
            value = str(Path(value).expanduser().resolve())
        out[key] = json.loads(json.dumps(value, default=str))
    return out


def _holds_parts(folder: Path) -> bool:
    """Whether ``folder`` holds anything named like a trace part (conservatively: any such name)."""
    try:
        return folder.is_dir() and any(folder.glob("part-*.parquet"))
    except OSError:
        return True


def check_same_run(path: PathLike, config: Any) -> None:
    """GraftlabError when the checkpoint ``path`` was saved by another run than ``config``'s (one
    of :data:`IDENTITY` differs): resuming it would continue another run's model and optimizer and
    write rows that match neither run. Checkpoints without an identity (older ones) are not checked."""
    theirs = saved_extra(Path(path)).get("identity")
    if not isinstance(theirs, dict):
        return
    mine = run_identity(config)
    for key in IDENTITY:
        # a None here is a setting not resolved yet (the task's default lr): it cannot differ
        if theirs.get(key) is None or mine.get(key) is None:
            continue
        if key == "out" and not _holds_parts(Path(mine[key])):
            continue  # a new trace that starts at the checkpoint's step rewrites no other recording's rows
        if json.dumps(theirs[key], sort_keys=True) != json.dumps(mine[key], sort_keys=True):
            raise GraftlabError(
                f"resume=True: the newest checkpoint in checkpoint_dir {str(Path(path).parent)!r} belongs to another "
                f"run ({key}={theirs[key]!r}, this run has {key}={mine[key]!r}); resume that run with its own "
                "settings, or give this run its own checkpoint_dir")


# a checkpoint being saved (``.tmp``) or an old one being replaced (``.old``), beside its final name
_SAVING = re.compile(r"\.step-\d{8,}(?:-[0-9A-Za-z]+)?\.[0-9a-f]{16}\.(?:tmp|old)")


def hold(folder: Path) -> Optional[int]:
    """Create the folder a checkpoint is saved into and take an ``flock`` on it, held until the
    returned descriptor is closed: :func:`clean_stale_saves` leaves a held folder alone."""
    os.mkdir(folder, 0o755)
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def clean_stale_saves(directory: PathLike) -> list[str]:
    """Delete the hidden folders of checkpoint saves a killed process left in ``directory`` (only
    graftlab's names for them, only real folders, and only those no live save holds)."""
    if fcntl is None:
        return []
    try:
        names = [n for n in os.listdir(directory) if _SAVING.fullmatch(n)]
    except OSError:
        return []
    removed = []
    for name in names:
        p = Path(directory) / name
        if p.is_symlink() or not p.is_dir():
            continue
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(p)
            removed.append(name)
        except OSError:
            pass  # a live save holds it
        finally:
            os.close(fd)
    return removed

