"""Divergence during a run: a non-finite check on every step that never makes the host wait for
the device (:class:`NonFiniteWatch`), and what it found (:class:`Divergence`). What the run does
next (stop, or restart from the last good state with a smaller learning rate) is
:mod:`graftlab.runs.restarts`.

How :func:`graftlab.runs.fit` uses it, per step (through :class:`~graftlab.runs.restarts.Guard`)::

    loss.backward(); optimizer.step(); scheduler.step()
    watch.observe(step, loss)                 # device ops only
    found = watch.poll(wait=...)              # the first bad step, read one step late on CUDA

The check keeps one int64 vector on the device, ``[loss, group_1..G]``, holding the first step each
went non-finite. The groups are a Graft's groups (its per-group ``norm_m``/``norm_d`` of the step,
already computed) or, for any other optimizer, its parameter tensors (the 2-norm of each gradient:
one ``_foreach_norm`` over the gradients, the pass ``clip_grad_norm_`` makes; a norm beyond the
dtype's range counts as non-finite, as there). Per step the vector's minimum is copied to pinned
host memory with ``non_blocking=True`` and an event; the host reads it after the next step has been
queued, so the device always has work and the host runs at most one step ahead. On CPU the copy is
the value itself, read the same step. The whole vector is read once, after a divergence, to name
the groups.
"""
from __future__ import annotations

import collections
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from graftlab.distill.divergence import name_list

NEVER = torch.iinfo(torch.int64).max


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
        from graftlab import names as wrappers

        named = {id(p): n for n, p in wrappers.named_parameters(model)}
    return [named.get(id(p), f"param.{i}") for i, p in enumerate(params)]
