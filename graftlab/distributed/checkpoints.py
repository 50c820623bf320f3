"""Checkpoints of a run through ``torch.distributed.checkpoint``: save, load, periodic, resume.

A checkpoint saved by N processes loads on any number, one included.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from graftlab import termination
from graftlab.distributed.env import _AVAILABLE, barrier as _barrier, dist, is_main, unwrap
from graftlab.errors import GraftlabError, OutputExistsError
from graftlab.outputs import write_text

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
    from graftlab.graft import Graft

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
    An existing ``path`` is an error unless ``overwrite``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    path = Path(path)
    if is_main() and path.exists():
        if not overwrite:
            raise OutputExistsError(path, "checkpoint")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
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
    # SIGTERM waits until the checkpoint is committed (inside dcp.save the exit would become an error)
    with termination.deferred():
        with _one_process_quiet():
            dcp.save(state, checkpoint_id=str(path))
        if is_main():
            world = dist.get_world_size() if _AVAILABLE and dist.is_initialized() else 1
            meta = {"format": CHECKPOINT_FORMAT, "world_size": world, "graft": graft_meta, "parts": sorted(state)}
            if extra is not None:
                meta["extra"] = json.loads(extra_json)
            write_text(path / CHECKPOINT_META, json.dumps(meta, indent=1))  # a checkpoint is complete once this exists
    _barrier()
    return path


def load_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``), in place.

    The model and optimizer may be wrapped or sharded differently and run on a different number of
    processes than when saved. Returns the checkpoint's metadata (``extra`` holds what was saved
    with it). Every rank calls it.
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
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise GraftlabError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
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
    with termination.deferred(), _one_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
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
    back at the saved step; the optimizer's learning rates come back with its state. Only the
    ``keep`` newest checkpoints are kept. A checkpoint saved by N processes resumes on any number.
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

    def path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("step-*") if (p / CHECKPOINT_META).is_file())

    def latest(self) -> Optional[Path]:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, extra: Optional[dict] = None) -> Path:
        last_epoch = getattr(self.scheduler, "last_epoch", None)
        path = save_checkpoint(
            self.path(step), self.model, self.optimizer,
            extra={"step": int(step), "scheduler_last_epoch": last_epoch, **(extra or {})}, overwrite=True,
        )
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
        """Load ``path`` (default: the newest checkpoint) and return the steps it had done; 0 when
        there is nothing to resume from."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            return 0
        meta = load_checkpoint(path, self.model, self.optimizer)
        extra = meta.get("extra") or {}
        step = int(extra.get("step", 0))
        last_epoch = extra.get("scheduler_last_epoch")
        if self.scheduler is not None and last_epoch is not None:
            self.scheduler.last_epoch = int(last_epoch)
            self.scheduler._last_lr = [g["lr"] for g in self.scheduler.optimizer.param_groups]
        return step


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
            raise GraftlabError("resume=True and checkpoint_every need checkpoint_dir")
        return None, 0
    ckpt = Checkpoints(directory, model, optimizer, scheduler, every=every)
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
    try:
        return int((json.loads((latest / CHECKPOINT_META).read_text()).get("extra") or {}).get("step", 0))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise GraftlabError(f"unreadable checkpoint metadata {latest / CHECKPOINT_META}: {err}") from None
