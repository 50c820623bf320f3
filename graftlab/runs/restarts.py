"""What a run does when it diverges (``on_divergence``): stop, or restart from the last good state
with the learning rate scaled down, at most ``max_restarts`` times: the restart action of LHOPT
(Almeida et al. 2021, Section 3: "learning to restart from checkpoints", for divergence among others).

    guard = Guard(config, model, optimizer, scheduler, device, distributed, ckpt, first, on_restart)
    per step:  guard.observe(step, loss); found = guard.poll(wait=...)
               if found: step = guard.restart(found)    # None: stop
               else: guard.save(done, last)             # checkpoints and restart points when due

Restart points: with ``checkpoint_dir``, its checkpoints (one is only written after the flags of
every step before it were read as finite; a fresh run writes one at step 0). Without it, copies of
the model, optimizer, scheduler position and RNG state in host memory: one of the start and one
taken every ``checkpoint_every`` steps (:data:`SNAPSHOT_EVERY` when 0) replacing the previous, also
only once the steps before it are known to be finite. Taking one copies the state to the host (a
device sync every that many steps); the loop already syncs every ``log_every`` steps for its
progress line. A restart goes back to the newest point; when the run diverges again before it
reaches a new one, the next restart goes one point further back (a point can be finite and still
too far gone, with weights that blow up at any learning rate). Checkpoints newer than the one a
restart goes back to belong to the abandoned attempt and are deleted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from graftlab.errors import GraftlabError
from graftlab.runs.divergence import Divergence, NonFiniteWatch, Restart

SNAPSHOT_EVERY = 100  # steps between in-memory restart points when checkpoint_every is 0


class MemorySnapshot:
    """One restart point in host memory: model and optimizer state dicts, scheduler position, RNG.

    Taking it copies every tensor to the host (a device sync); restoring loads fresh device copies,
    so the snapshot can be restored again.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer, scheduler: Any) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step: Optional[int] = None

    def take(self, step: int) -> None:
        self._model = {k: _host_copy(v) for k, v in self.model.state_dict().items()}
        self._optimizer = _map_tensors(self.optimizer.state_dict(), _host_copy)
        self._last_epoch = self.scheduler.last_epoch
        self._rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.step = step

    def restore(self) -> int:
        self.model.load_state_dict(self._model)
        # the optimizer keeps what it is given and updates it in place: give it copies
        self.optimizer.load_state_dict(_map_tensors(self._optimizer, torch.clone))
        self.scheduler.last_epoch = self._last_epoch
        torch.set_rng_state(self._rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)
        return int(self.step)


def _host_copy(t: Tensor) -> Tensor:
    return t.detach().to("cpu", copy=True)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


@dataclass
class Guard:
    """The divergence policy of one run: check every step, stop or restart (see the module).

    ``config`` gives ``on_divergence``, ``divergence_lr_factor``, ``max_restarts`` and
    ``checkpoint_every``; ``scheduler`` is the run's ``LambdaLR``, whose base learning rates the
    restarts scale; ``ckpt`` the run's :class:`~graftlab.distributed.Checkpoints` or None;
    ``first`` the steps already done (a resumed run takes its restart count and lr scale back
    from the checkpoint). ``on_restart(restart)`` runs after the state is restored (a recorder
    rewinds its trace there). Raises :class:`GraftlabError` when a restart point cannot be kept:
    ``on_divergence="restart"`` with sharded (DTensor) parameters and no ``checkpoint_dir``.
    """

    config: Any
    model: nn.Module
    optimizer: Optimizer
    scheduler: Any
    device: torch.device
    distributed: bool = False
    ckpt: Any = None
    first: int = 0
    on_restart: Optional[Callable[[Restart], None]] = None
    restarts: list[Restart] = field(default_factory=list)
    count: int = 0  # restarts so far (including those of the run this one resumes)
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        cfg = self.config
        self.mode = getattr(cfg, "on_divergence", "stop")
        self.factor = float(getattr(cfg, "divergence_lr_factor", 0.5))
        self.max_restarts = int(getattr(cfg, "max_restarts", 3))
        self.watch = NonFiniteWatch(self.optimizer, self.model, self.device, self.distributed)
        self._base_lrs = list(self.scheduler.base_lrs)
        if self.ckpt is not None and self.first > 0:
            state = self._checkpoint_state()
            self.count, self.lr_scale = int(state.get("restarts", 0)), float(state.get("lr_scale", 1.0))
            if self.lr_scale != 1.0:
                self._apply_lr_scale()
        self.snapshots: Optional[list[MemorySnapshot]] = None  # the start's, then the newest
        self._streak = 0  # restarts since the last new restart point
        self._mine: set[str] = set()  # checkpoints of this run (a folder may hold an older run's)
        if self.mode != "restart":
            return
        if self.ckpt is None:
            if any(type(p) not in (Tensor, nn.Parameter) for p in self.model.parameters()):
                raise GraftlabError("{on_divergence='restart'} with sharded parameters needs {checkpoint_dir} "
                                    "(the restart points are checkpoints then)",
                                    param=("on_divergence", "checkpoint_dir"))
            self.every = int(getattr(cfg, "checkpoint_every", 0) or SNAPSHOT_EVERY)
            self.snapshots = [MemorySnapshot(self.model, self.optimizer, self.scheduler)]
            self.snapshots[0].take(self.first)
        elif self.first > 0:
            self._mine.add(self.ckpt.latest().name)  # the one this run resumed from
        else:
            self._mine.add(self.ckpt.save(0, extra=self.extra()).name)  # a good state to go back to

    # -- per step ------------------------------------------------------------------------------
    def observe(self, step: int, loss: Tensor) -> None:
        self.watch.observe(step, loss)

    def poll(self, wait: bool = False) -> Optional[Divergence]:
        return self.watch.poll(wait)

    def due(self, done: int, last: bool) -> bool:
        """Whether a restart point or checkpoint is saved after ``done`` steps (the flags of every
        step before it must be read first)."""
        return self._checkpoint_due(done, last) or self._snapshot_due(done, last)

    def save(self, done: int, last: bool) -> None:
        """After ``done`` steps known to be finite: the checkpoint and restart point that are due."""
        if self._checkpoint_due(done, last):
            self._mine.add(self.ckpt.save(done, extra=self.extra()).name)
            self._streak = 0
        if self._snapshot_due(done, last):
            if len(self.snapshots) == 1:
                self.snapshots.append(MemorySnapshot(self.model, self.optimizer, self.scheduler))
            self.snapshots[-1].take(done)
            self._streak = 0

    def _snapshot_due(self, done: int, last: bool) -> bool:
        return self.snapshots is not None and done % self.every == 0 and not last

    def _checkpoint_due(self, done: int, last: bool) -> bool:
        return self.ckpt is not None and (bool(self.ckpt.every and done % self.ckpt.every == 0) or last)

    # -- after a divergence ----------------------------------------------------------------------
    def restart(self, found: Divergence) -> Optional[int]:
        """Restore the last good state with the lr scaled by the factor; the step to run next, or
        None when the run stops (``on_divergence="stop"`` or ``max_restarts`` used up)."""
        points = self.snapshots if self.snapshots is not None else self._checkpoints()
        if self.mode != "restart" or self.count >= self.max_restarts or not points:
            return None
        self.count += 1
        self.lr_scale *= self.factor
        point = points[max(0, len(points) - 1 - self._streak)]
        self._streak += 1
        if isinstance(point, MemorySnapshot):
            step, source = point.restore(), "memory"
        else:
            self._drop_checkpoints_after(point)
            step, source = self.ckpt.resume(point), str(point)
        self._apply_lr_scale()
        self.watch.reset()
        event = Restart(self.count, found, step, self.lr_scale, source)
        self.restarts.append(event)
        if self.on_restart is not None:
            self.on_restart(event)
        return step

    def _drop_checkpoints_after(self, point: Any) -> None:
        import shutil

        from graftlab.distributed.checkpoints import checkpoint_step
        from graftlab.distributed.env import barrier, is_main

        if is_main():
            for newer in self._checkpoints():
                if checkpoint_step(newer) > checkpoint_step(point):
                    shutil.rmtree(newer, ignore_errors=True)
        barrier()

    def _checkpoints(self) -> list:
        """This run's complete checkpoints that are restart points, oldest first (the folder keeps
        the newest few of this run's; another run's checkpoints there are never among them)."""
        return [p for p in self.ckpt.all() if p.name in self._mine] if self.ckpt is not None else []

    def _apply_lr_scale(self) -> None:
        """Base lrs x the scale; the lrs of the step to come set from the schedule at its position."""
        s = self.scheduler
        s.base_lrs = [b * self.lr_scale for b in self._base_lrs]
        lrs = [b * f(s.last_epoch) for b, f in zip(s.base_lrs, s.lr_lambdas)]
        for group, lr in zip(s.optimizer.param_groups, lrs):
            group["lr"] = lr
        s._last_lr = lrs

    def extra(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run goes on with the same lr scale, and can
        tell whether its schedule settings give the steps already run the same rates."""
        from graftlab.distributed.trust import run_identity
        from graftlab.runs.resume_check import schedule_settings

        return {"divergence": {"restarts": self.count, "lr_scale": self.lr_scale},
                "lr_schedule": schedule_settings(self.config), "identity": run_identity(self.config)}

    def _checkpoint_state(self) -> dict[str, Any]:
        return _checkpoint_state(self.ckpt.latest())

    def report(self, stopped: Optional[Divergence]) -> dict[str, Any]:
        """The metrics file's ``divergence`` entry."""
        return {"on_divergence": self.mode, "divergence_lr_factor": self.factor, "max_restarts": self.max_restarts,
                "stopped": stopped.to_dict() if stopped is not None else None,
                "restarts": [r.to_dict() for r in self.restarts], "restart_count": self.count,
                "lr_scale": self.lr_scale}


def _checkpoint_state(latest: Any) -> dict[str, Any]:
    """The restart count and lr scale a checkpoint was saved with (``{}`` for none)."""
    import json

    from graftlab.distributed.checkpoints import CHECKPOINT_META

    if latest is None:
        return {}
    meta = json.loads((latest / CHECKPOINT_META).read_text())
    return (meta.get("extra") or {}).get("divergence") or {}


def resumed_restarts(config: Any) -> int:
    """Restarts already done by the run that ``config.resume`` continues (0 when not resuming)."""
    from graftlab.distributed.checkpoints import Checkpoints

    if getattr(config, "checkpoint_dir", None) is None or not getattr(config, "resume", False):
        return 0
    return int(_checkpoint_state(Checkpoints(config.checkpoint_dir, None, None).latest()).get("restarts", 0))
