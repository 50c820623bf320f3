"""Divergence during a run: a non-finite check on every step that never makes the host wait for the
device, and what the run does next (``on_divergence``): stop, or restart from the last good state
with the learning rate scaled down, at most ``max_restarts`` times (the restart action of LHOPT,
Almeida et al. 2021, Section 3: "learning to restart from checkpoints", for divergence among others).

How :func:`graftlab.runs.fit` uses it, per step::

    loss.backward(); optimizer.step(); scheduler.step()
    guard.observe(step, loss)                 # device ops only
    found = guard.poll(wait=...)              # the first bad step, read one step late on CUDA
    if found: step = guard.restart(found)     # None: stop

The check (:class:`NonFiniteWatch`) keeps one int64 vector on the device, ``[loss, group_1..G]``,
holding the first step each went non-finite. The groups are a Graft's groups (its per-group
``norm_m``/``norm_d`` of the step, already computed) or, for any other optimizer, its parameter
tensors (the 2-norm of each gradient: one ``_foreach_norm`` over the gradients, the pass
``clip_grad_norm_`` makes; a norm beyond the dtype's range counts as non-finite, as there). Per
step the vector's minimum is copied to pinned host memory with ``non_blocking=True`` and an event;
the host reads it after the next step has been queued, so the device always has work and the host
runs at most one step ahead. On CPU the copy is the value itself, read the same step. The whole
vector is read once, after a divergence, to name the groups.

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

import collections
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from graftlab.divergence import name_list
from graftlab.errors import GraftlabError

NEVER = torch.iinfo(torch.int64).max
SNAPSHOT_EVERY = 100  # steps between in-memory restart points when checkpoint_every is 0


@dataclass
class Divergence:
    """The first non-finite values of a run, as the check saw them."""

    step: int  # first step (0-based) with a non-finite loss, gradient or step norm
    detected: int  # last step run when it was seen: ``step`` on CPU, at most ``step + 1`` on CUDA
    loss_step: Optional[int]  # first step whose loss was not finite (None: it stayed finite)
    groups: dict[str, int]  # group -> first non-finite step, for the groups bad by ``detected``
    what: str  # what was checked per group: "step norms" (a Graft) or "gradient norms"
    total: int  # groups checked

    def first_groups(self) -> list[str]:
        return [g for g, s in self.groups.items() if s == self.step]

    def message(self) -> str:
        """``training diverged at step 6: gradient norms not finite in 3 of 9 groups (a, b, c), loss not
        finite from step 7``."""
        clauses, first = [], self.first_groups()
        if first:
            clauses.append(f"{self.what} not finite in {name_list(first, self.total)}")
        if self.loss_step is not None:
            clauses.append("loss not finite" + (f" from step {self.loss_step}" if self.loss_step != self.step else ""))
        later = len(self.groups) - len(first)
        if later:
            clauses.append(f"{later} more group{'s' if later > 1 else ''} by step {self.detected}")
        return f"training diverged at step {self.step}: " + ", ".join(clauses)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Restart:
    """One restart: the divergence, the step the run went back to and the lr scale from then on."""

    count: int  # 1 for the first restart
    divergence: Divergence
    from_step: int  # steps done by the state restored (the next step run is this one)
    lr_scale: float  # factor on the schedule owner's learning rate from now on (cumulative)
    source: str  # "memory" or the checkpoint directory

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "divergence": self.divergence.to_dict()}


class NonFiniteWatch:
    """Per-step non-finite flags of the loss and of each group, kept on the device (see the module).

    Args:
        optimizer: a :class:`~graftlab.Graft` (groups: its ``group_names``, checked through
            ``last_stats`` norms) or any optimizer (groups: its parameter tensors, checked through
            their gradients).
        model: names the parameter tensors of a plain optimizer (``named_parameters()``).
        device: where the flags live (the parameters' device).
        distributed: take the maximum of the flags over ranks each step (one all-reduce of G + 1
            int32 values, queued on the device), so every rank stops or restarts at the same step.
        lagged: read the flags through the host copies one step late (default: on CUDA). On CPU
            the copies are synchronous and the events stand-ins (for tests of the CUDA logic).
    """

    def __init__(self, optimizer: Optimizer, model: Optional[nn.Module], device: torch.device,
                 distributed: bool = False, lagged: Optional[bool] = None) -> None:
        self.optimizer = optimizer
        self.graft = hasattr(optimizer, "last_stats") and hasattr(optimizer, "group_names")
        if self.graft:
            self.names, self.what = list(optimizer.group_names), "step norms"
        else:
            self.params = [p for g in optimizer.param_groups for p in g["params"]]
            self.names, self.what = _param_names(self.params, model), "gradient norms"
        self.device, self.distributed = torch.device(device), distributed
        self.cuda = self.device.type == "cuda"
        self.lagged = self.cuda if lagged is None else lagged
        self._first = torch.full((1 + len(self.names),), NEVER, dtype=torch.int64, device=self.device)
        self._all_ok = torch.ones(len(self.names), dtype=torch.bool, device=self.device)
        self._index: dict[tuple[int, ...], Tensor] = {}
        self._pending: collections.deque = collections.deque()  # (step, slot) copies not read yet
        self._last: Optional[int] = None
        if self.lagged:  # two slots: the step being read and the one queued behind it
            self._host = torch.empty(2, dtype=torch.int64, pin_memory=self.cuda)
            self._events = [torch.cuda.Event() if self.cuda else _DoneEvent() for _ in range(2)]

    def observe(self, step: int, loss: Tensor) -> None:
        """Queue the check of ``step`` (after the optimizer step, gradients still in place)."""
        bad = ~torch.cat([torch.isfinite(loss.detach()).reshape(1), self._groups_ok()])
        if self.distributed:
            import torch.distributed as dist

            flags = bad.to(torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad = flags.bool()
        self._first.masked_fill_(bad & (self._first == NEVER), step)
        self._last = step
        if self.lagged:
            slot = step % 2
            self._host[slot].copy_(self._first.amin(), non_blocking=True)
            self._events[slot].record()
            self._pending.append((step, slot))

    def poll(self, wait: bool = False) -> Optional[Divergence]:
        """The divergence seen so far, or None. On CUDA, reads the copies whose events are done and
        waits only for a step that has the next one queued behind it (``wait``: for all)."""
        if not self.lagged:
            if self._last is None:
                return None
            first = int(self._first.amin())  # a CPU tensor: nothing to wait for
            return None if first == NEVER else self._found(first, self._last)
        while self._pending:
            step, slot = self._pending[0]
            event = self._events[slot]
            if not event.query():
                if not (wait or len(self._pending) > 1):
                    break
                event.synchronize()
            self._pending.popleft()
            first = int(self._host[slot])
            if first != NEVER:
                self._pending.clear()
                return self._found(first, step)
        return None

    def reset(self) -> None:
        """Forget every flag (after a restart the steps run again)."""
        self._pending.clear()
        self._last = None
        self._first.fill_(NEVER)

    def _groups_ok(self) -> Tensor:
        if self.graft:
            return torch.isfinite(self.optimizer.last_stats[:2]).all(0)
        grads, present = [], []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            g = g.to_local() if hasattr(g, "to_local") else g  # a DTensor: this rank's shard
            grads.append(g.coalesce().values() if g.is_sparse else g)
            present.append(i)
        if not grads:
            return self._all_ok
        # the 2-norm: the fastest reduction (the inf-norm is ~10x slower on CPU); a gradient whose
        # norm overflows counts as non-finite, as in clip_grad_norm_(error_if_nonfinite=True)
        norms = torch._foreach_norm(grads, 2)
        if len({n.dtype for n in norms}) > 1:
            norms = [n.double() for n in norms]
        ok = torch.isfinite(torch.stack(norms))
        if len(present) == len(self.params):
            return ok
        key = tuple(present)
        if key not in self._index:  # built once per set of tensors with gradients
            self._index[key] = torch.tensor(present, device=self.device)
        return self._all_ok.clone().index_copy_(0, self._index[key], ok)

    def _found(self, first: int, detected: int) -> Divergence:
        steps = self._first.tolist()  # the one full read, after the fact
        groups = {n: s for n, s in zip(self.names, steps[1:]) if s != NEVER}
        return Divergence(first, detected, steps[0] if steps[0] != NEVER else None, groups, self.what, len(self.names))


class _DoneEvent:
    """The CPU stand-in of a CUDA event: CPU copies are done when they return."""

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def _param_names(params: list[Tensor], model: Optional[nn.Module]) -> list[str]:
    named: dict[int, str] = {}
    if model is not None:
        from graftlab.distributed.env import unwrap

        named = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [named.get(id(p), f"param.{i}") for i, p in enumerate(params)]


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
        if self.mode != "restart":
            return
        if self.ckpt is None:
            if any(type(p) not in (Tensor, nn.Parameter) for p in self.model.parameters()):
                raise GraftlabError("on_divergence='restart' with sharded parameters needs checkpoint_dir "
                                    "(the restart points are checkpoints then)")
            self.every = int(getattr(cfg, "checkpoint_every", 0) or SNAPSHOT_EVERY)
            self.snapshots = [MemorySnapshot(self.model, self.optimizer, self.scheduler)]
            self.snapshots[0].take(self.first)
        elif self.ckpt.latest() is None:
            self.ckpt.save(self.first, extra=self.extra())  # a good state to go back to

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
            self.ckpt.save(done, extra=self.extra())
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
        if self.mode != "restart" or self.count >= self.max_restarts:
            return None
        self.count += 1
        self.lr_scale *= self.factor
        points = self.snapshots if self.snapshots is not None else self.ckpt.all()
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

        from graftlab.distributed.env import barrier, is_main

        if is_main():
            for newer in self.ckpt.all():
                if newer.name > point.name:  # step-<8 digits>: name order is step order
                    shutil.rmtree(newer, ignore_errors=True)
        barrier()

    def _apply_lr_scale(self) -> None:
        """Base lrs x the scale; the lrs of the step to come set from the schedule at its position."""
        s = self.scheduler
        s.base_lrs = [b * self.lr_scale for b in self._base_lrs]
        lrs = [b * f(s.last_epoch) for b, f in zip(s.base_lrs, s.lr_lambdas)]
        for group, lr in zip(s.optimizer.param_groups, lrs):
            group["lr"] = lr
        s._last_lr = lrs

    def extra(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run goes on with the same lr scale."""
        return {"divergence": {"restarts": self.count, "lr_scale": self.lr_scale}}

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
