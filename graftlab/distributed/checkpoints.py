"""Checkpoints of a run through ``torch.distributed.checkpoint``: save, load, periodic, resume.

A checkpoint saved by N processes loads on any number, one included.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from graftlab.io import termination
from graftlab.distributed.env import _AVAILABLE, barrier as _barrier, dist, is_main, unwrap
from graftlab.errors import GraftlabError, OutputExistsError
from graftlab.distributed.trust import (
    RUN_ID, check_same_run, clean_stale_saves, digests, hold, put_in_place, reason, saved_extra, verify,
)
from graftlab.io.outputs import write_text

CHECKPOINT_FORMAT = "graftlab.checkpoint/1"
CHECKPOINT_META = "graftlab.json"

PathLike = Union[str, os.PathLike]

# Work that must be durable before a checkpoint of an optimizer counts as saved (a Recorder's rows
# up to the checkpoint's step), kept on the optimizer itself: {handle id: callable}. (A module-level
# weak-key table would keep the optimizer alive through the callables that refer back to it.)
_BEFORE_SAVE = "_graftlab_before_checkpoint"


def before_checkpoint(optimizer: torch.optim.Optimizer, fn: Callable[[], None]) -> RemovableHandle:
    """Call ``fn()`` at the start of every :func:`save_checkpoint` of ``optimizer``, before the
    checkpoint is written and committed; returns a handle whose ``remove()`` undoes it.

    A :class:`~graftlab.Recorder` registers its ``sync`` here: a resumed run then finds every
    recorded step before the checkpoint on disk, so resuming leaves no gap in the trace.
    """
    hooks = optimizer.__dict__.setdefault(_BEFORE_SAVE, OrderedDict())  # RemovableHandle needs it weak-referable
    handle = RemovableHandle(hooks)
    hooks[handle.id] = fn
    return handle


def _before_save(optimizer: torch.optim.Optimizer) -> None:
    for fn in list(getattr(optimizer, _BEFORE_SAVE, {}).values()):
        fn()


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.optim.Optimizer], Optional[dict]]:
    from graftlab.graft.optimizer import Graft

    if isinstance(optimizer, Graft):
        for role, child in (("magnitude", optimizer.magnitude), ("direction", optimizer.direction)):
            if isinstance(child, Graft):
                raise GraftlabError(f"checkpoints of a Graft whose {role} is itself a Graft are not supported")
        meta = optimizer.state_dict()["graft"]
        return {"magnitude": optimizer.magnitude, "direction": optimizer.direction}, meta
    return {"optimizer": optimizer}, None


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    extra: Optional[dict] = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` and ``optimizer`` (a :class:`~graftlab.Graft` or any optimizer) to the
    directory ``path`` with ``torch.distributed.checkpoint``; every rank calls it.

    Each rank writes its own shards, replicated tensors are written once, and the checkpoint loads
    on any number of processes (:func:`load_checkpoint`), one included. ``extra`` (JSON: step,
    scheduler state, config) goes to ``graftlab.json`` beside the shards, written by rank 0.
    An existing ``path`` is an error unless ``overwrite``; it is replaced only once the new
    checkpoint is complete (written under a hidden name beside it, then renamed), so a failed save
    (a full disk) leaves it as it was. ``graftlab.json`` records a SHA-256 of every file saved, which
    :func:`load_checkpoint` checks before DCP unpickles anything (:mod:`graftlab.distributed.trust`).

    Raises:
        GraftlabError: ``path`` exists without ``overwrite``, or the save failed (one line with the
            operating system's reason).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    path = Path(path)
    if is_main() and path.exists() and not overwrite:
        raise OutputExistsError(path, "checkpoint")
    _before_save(optimizer)  # e.g. the trace rows up to this step, on disk before the checkpoint exists
    _barrier()
    model = unwrap(model)
    children, graft_meta = _optimizer_parts(optimizer)
    state = {"model": get_model_state_dict(model)}
    for role, child in children.items():
        state[role] = get_optimizer_state_dict(model, child)
    if extra is not None:
        try:
            extra_json = json.dumps(extra)
        except TypeError as e:
            raise GraftlabError(f"checkpoint extra must be JSON-serializable: {e}") from None
    # written under a hidden name and renamed into place: an old checkpoint at ``path`` is deleted
    # only once the new one is complete, and a failed save (a full disk) leaves it as it was
    tmp = Path(_from_main(str(path.with_name(f".{path.name}.{uuid.uuid4().hex[:16]}.tmp"))))
    held = None
    if is_main():
        if path.parent.is_dir():
            clean_stale_saves(path.parent)  # the folders of a killed save
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            held = hold(tmp)
        except OSError as err:  # a read-only or full folder: one line, nothing changed
            raise GraftlabError(f"{path}: saving the checkpoint failed ({reason(err)})") from None
    _barrier()
    # SIGTERM waits until the checkpoint is committed (inside dcp.save the exit would become an error)
    with termination.deferred():
        try:
            with _one_process_quiet():
                dcp.save(state, checkpoint_id=str(tmp))
            if is_main():
                world = dist.get_world_size() if _AVAILABLE and dist.is_initialized() else 1
                meta = {"format": CHECKPOINT_FORMAT, "world_size": world, "graft": graft_meta, "parts": sorted(state),
                        "digests": digests(tmp)}
                if extra is not None:
                    meta["extra"] = json.loads(extra_json)
                write_text(tmp / CHECKPOINT_META, json.dumps(meta, indent=1))  # complete once this exists
                put_in_place(tmp, path)
        except BaseException as err:
            if is_main():
                shutil.rmtree(tmp, ignore_errors=True)
                if held is not None:
                    os.close(held)
                    held = None
            # torch's CheckpointException is a BaseException: all but an interruption become one line
            if not isinstance(err, (GraftlabError, KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise GraftlabError(f"{path}: saving the checkpoint failed ({reason(err)})") from err
            raise
    if held is not None:
        os.close(held)
    _barrier()
    return path


def load_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``), in place.

    The model and optimizer may be wrapped or sharded differently and run on a different number of
    processes than when saved. Returns the checkpoint's metadata (``extra`` holds what was saved
    with it). Every rank calls it.

    Raises:
        GraftlabError: the folder is not a complete graftlab checkpoint, a file's digest differs
            from the one recorded at save time (nothing is unpickled then), or DCP cannot load it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    meta_file = path / CHECKPOINT_META
    if not meta_file.is_file():
        raise GraftlabError(f"{path} is not a complete graftlab checkpoint (no {CHECKPOINT_META})")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise GraftlabError(f"unreadable checkpoint metadata {meta_file}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise GraftlabError(f"{path}: unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if not isinstance(meta.get("parts"), list) or (meta.get("graft") is not None and not isinstance(meta["graft"], dict)):
        raise GraftlabError(f"{path}: malformed checkpoint metadata {meta_file}")
    verify(path, meta)  # before DCP unpickles anything
    model = unwrap(model)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    children, graft_meta = ({}, None) if optimizer is None else _optimizer_parts(optimizer)
    if optimizer is not None:
        if set(children) != set(meta["parts"]) - {"model"}:
            raise GraftlabError(
                f"{path} holds optimizer parts {sorted(set(meta['parts']) - {'model'})}, "
                f"the optimizer given has {sorted(children)}"
            )
        if graft_meta is not None and (
            meta["graft"]["granularity"] != graft_meta["granularity"] or meta["graft"]["groups"] != graft_meta["groups"]
        ):
            raise GraftlabError(f"{path} was saved with a different grafting partition (granularity or groups)")
    for role, child in children.items():
        state[role] = get_optimizer_state_dict(model, child)
    try:
        with termination.deferred(), _one_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
    except BaseException as err:  # noqa: BLE001 - a damaged checkpoint is one line (CheckpointException included)
        if isinstance(err, (GraftlabError, KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise GraftlabError(f"{path}: cannot load the checkpoint ({reason(err)})") from err
    set_model_state_dict(model, state["model"])
    for role, child in children.items():
        set_optimizer_state_dict(model, child, state[role])
    if graft_meta is not None:
        optimizer._steps = int(meta["graft"]["steps"])
    return meta


@contextlib.contextmanager
def _one_process_quiet():
    """A one-process save or load is intended here: silence DCP's warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class Checkpoints:
    """Periodic checkpoints of a run in ``directory/step-<8 digits>``, and resuming from the newest.

    Usage in a training loop (every rank makes the same calls)::

        ckpt = Checkpoints("runs/ckpt", model, opt, scheduler, every=500)
        start = ckpt.resume() if resume else 0     # steps already done (0: nothing to resume)
        for step in range(start, steps):
            ...; opt.step(); scheduler.step()
            ckpt.maybe_save(step + 1)

    The scheduler (a ``LambdaLR`` or any scheduler that derives the lr from ``last_epoch``) is put
    back at the saved step; the optimizer's learning rates come back with its state. A checkpoint
    saved by N processes resumes on any number.

    The folder may hold checkpoints of other runs. Each checkpoint records the run that saved it
    (``extra["run"]``, an id drawn at the run's first save; a resumed run keeps the id of the
    checkpoint it loaded), and, as Lightning's ``ModelCheckpoint`` does with its top-k files,
    ``keep`` counts and deletes only this run's own checkpoints: another run's are never deleted
    nor overwritten (a step whose name another run holds is saved as ``step-<8 digits>-<run>``).
    Until it saves or resumes, an instance speaks for the run it would resume: the one whose
    checkpoint was saved last (checkpoints of older versions, without a run id, count as one run).
    """

    def __init__(
        self,
        directory: PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        every: int = 0,
        keep: int = 2,
    ) -> None:
        if every < 0 or keep < 1:
            raise GraftlabError(f"checkpoint every must be >= 0 and keep >= 1, got {every} and {keep}")
        self.directory = Path(directory)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.every, self.keep = int(every), int(keep)
        self.run: Optional[str] = None  # this run's id (None: an older checkpoint's run, or not known yet)
        self._bound = False  # whether self.run is this run's: set by the first save or resume

    def path(self, step: int) -> Path:
        """Where this run saves its checkpoint of ``step``: the name it already has there, else
        ``step-<8 digits>``, unless another run's complete checkpoint holds that name."""
        for found in self._found():
            if found.step == step and found.run == self.run and self._bound:
                return found.path
        plain = self.directory / f"step-{step:08d}"
        if _complete(plain) and (not self._bound or _run_of(plain) != self.run):
            return self.directory / f"step-{step:08d}-{self.run or 'v0'}"
        return plain

    def _found(self) -> list["_Found"]:
        """Every complete checkpoint in the folder, any run's."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.glob("step-*"):
            m = _NAME.fullmatch(p.name)
            if m is None or not _complete(p):
                continue
            extra = saved_extra(p)
            saved = extra.get("saved_at")
            if not isinstance(saved, (int, float)):  # checkpoints of older versions: the file's time
                saved = (p / CHECKPOINT_META).stat().st_mtime
            run = extra.get("run")
            if run is not None and not (isinstance(run, str) and RUN_ID.fullmatch(run)):
                # not a checkpoint graftlab saved: its run id would become part of a folder name
                raise GraftlabError(f"{p}: the checkpoint's run id {run!r} is not one graftlab writes (letters and "
                                    "digits); move it out of checkpoint_dir")
            out.append(_Found(int(m.group(1)), run, float(saved), p))
        return out

    def all(self) -> list[Path]:
        """This run's complete checkpoints, oldest first (before this instance saved or resumed:
        those of the run it would resume)."""
        found = self._found()
        if not found:
            return []
        run = self.run if self._bound else max(found, key=lambda f: (f.saved, f.step)).run
        return [f.path for f in sorted((f for f in found if f.run == run), key=lambda f: (f.step, f.saved))]

    def latest(self) -> Optional[Path]:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, extra: Optional[dict] = None) -> Path:
        if not self._bound:
            self.run, self._bound = _from_main(uuid.uuid4().hex[:12]), True
        last_epoch = getattr(self.scheduler, "last_epoch", None)
        # every rank saves under rank 0's name for it (the folder may change under the others' eyes)
        path = Path(_from_main(str(self.path(step))))
        ours = {"step": int(step), "scheduler_last_epoch": last_epoch, "run": self.run, "saved_at": time.time()}
        path = save_checkpoint(path, self.model, self.optimizer, extra={**ours, **(extra or {})}, overwrite=True)
        if is_main():
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return path

    def maybe_save(self, done: int, last: bool = False) -> Optional[Path]:
        """Save when ``done`` (steps completed) is a multiple of ``every``, or on the ``last`` step."""
        if (self.every and done % self.every == 0) or last:
            return self.save(done)
        return None

    def resume(self, path: Optional[PathLike] = None) -> int:
        """Load ``path`` (default: this run's newest checkpoint, or before any save the newest of
        the run that saved last) and return the steps it had done; 0 when there is nothing to
        resume from. The run goes on as the run of the checkpoint loaded."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            return 0
        extra = saved_extra(Path(path))
        run = extra.get("run")
        if run is not None and not (isinstance(run, str) and RUN_ID.fullmatch(run)):
            raise GraftlabError(f"{path}: the checkpoint's run id {run!r} is not one graftlab writes "
                                "(letters and digits); not loading it")
        meta = load_checkpoint(path, self.model, self.optimizer)
        extra = meta.get("extra") or {}
        self.run, self._bound = run, True
        try:
            step = int(extra.get("step", 0))
        except (TypeError, ValueError):
            raise GraftlabError(f"{path}: the checkpoint's step {extra.get('step')!r} is not a step number") from None
        if step < 0:
            raise GraftlabError(f"{path}: the checkpoint's step {step} is negative")
        last_epoch = extra.get("scheduler_last_epoch")
        if self.scheduler is not None and last_epoch is not None:
            self.scheduler.last_epoch = int(last_epoch)
            self.scheduler._last_lr = [g["lr"] for g in self.scheduler.optimizer.param_groups]
        return step


# step-<8 or more digits>, and -<run> where another run held the plain name
_NAME = re.compile(r"step-(\d{8,})(?:-([0-9A-Za-z]+))?")



@dataclass(frozen=True)
class _Found:
    step: int
    run: Optional[str]
    saved: float
    path: Path


def checkpoint_step(path: PathLike) -> int:
    """The step of a checkpoint folder named by :class:`Checkpoints` (``step-<N>[-<run>]``)."""
    m = _NAME.fullmatch(Path(path).name)
    if m is None:
        raise GraftlabError(f"{path} is not named as a graftlab checkpoint (step-<N>)")
    return int(m.group(1))


def _complete(path: Path) -> bool:
    return (path / CHECKPOINT_META).is_file()


def _run_of(path: Path) -> Optional[str]:
    run = saved_extra(path).get("run")
    return run if isinstance(run, str) else None


def _from_main(value: str) -> str:
    """``value`` as rank 0 has it, on every rank (itself without torch.distributed)."""
    if not (_AVAILABLE and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoints_for(config: Any, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None):
    """``(Checkpoints or None, steps already done)`` for a run configured with ``checkpoint_dir``,
    ``checkpoint_every`` and ``resume`` (the fields of ``TrainConfig`` / ``RecordConfig``); loads
    the newest checkpoint when resuming. Without ``checkpoint_dir``: ``(None, 0)``."""
    directory = getattr(config, "checkpoint_dir", None)
    every = int(getattr(config, "checkpoint_every", 0) or 0)
    resume = bool(getattr(config, "resume", False))
    if directory is None:
        # with on_divergence="restart", checkpoint_every alone spaces in-memory restart points
        if resume or (every and getattr(config, "on_divergence", "stop") != "restart"):
            raise GraftlabError("{resume=True} and {checkpoint_every} need {checkpoint_dir}",
                                param=("resume", "checkpoint_every", "checkpoint_dir"))
        return None, 0
    ckpt = Checkpoints(directory, model, optimizer, scheduler, every=every)
    if resume and ckpt.latest() is not None:
        check_same_run(ckpt.latest(), config)
    first = ckpt.resume() if resume else 0
    steps = getattr(config, "steps", None)
    # first == steps: killed after the final checkpoint; the run has no step left, only its end
    if steps is not None and first > steps:
        raise GraftlabError(f"{ckpt.latest()} has done {first} steps already: the run asks for {steps}")
    return ckpt, first


def resume_step(config: Any) -> int:
    """Steps done by the newest checkpoint a resumed run would load (0 when not resuming or none);
    reads only ``graftlab.json``, so a recorder can be opened at the right step before the run."""
    directory = getattr(config, "checkpoint_dir", None)
    if directory is None or not getattr(config, "resume", False):
        return 0
    latest = Checkpoints(directory, None, None).latest()
    if latest is None:
        return 0
    check_same_run(latest, config)  # before a recorder cuts a trace back to another run's step
    try:
        verify(latest, json.loads((latest / CHECKPOINT_META).read_text()))  # and before it trusts the folder
    except (OSError, ValueError, AttributeError) as err:
        if isinstance(err, GraftlabError):
            raise
        raise GraftlabError(f"unreadable checkpoint metadata {latest / CHECKPOINT_META}: {err}") from None
    try:
        return int((json.loads((latest / CHECKPOINT_META).read_text()).get("extra") or {}).get("step", 0))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise GraftlabError(f"unreadable checkpoint metadata {latest / CHECKPOINT_META}: {err}") from None

