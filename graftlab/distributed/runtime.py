"""A run's one view of ``torch.distributed``: set up at its start, asked for everything after.

    rt = Runtime.start(config.device)           # under torchrun: joins the process group
    names = rt.wrap_task(task, config.parallel) # DDP or FSDP2 wrapping, this rank's rows
    rec = rt.main_only(Recorder, graft, path)   # rank 0 writes, the others get a no-op stand-in
    loss = rt.mean(loss)                        # the global-batch loss (one all-reduce, no host sync)
    ckpt, first = rt.checkpoints(config, model, optimizer, scheduler)

Outside torchrun every method is the one-process answer (no wrapping, ``writes`` is True, ``mean``
returns its argument), so a run's code is the same for one process and for many.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from graftlab.distributed.checkpoints import Checkpoints, checkpoints_for, resume_step
from graftlab.distributed.env import (
    DistEnv,
    _Nothing,
    barrier,
    current,
    distribute_task,
    global_mean,
    setup,
)


@dataclass(frozen=True)
class Runtime:
    """Where this process stands (``env``) and what a run asks of the process group."""

    env: DistEnv

    @classmethod
    def start(cls, device: Union[str, torch.device, None] = "auto") -> "Runtime":
        """This process's place in the run: under torchrun joins the process group (once) and waits
        for every rank, so that no rank writes before all have checked their config; otherwise a
        one-process runtime on ``device`` (``"auto"``: CUDA when available)."""
        dev = setup(device)
        env = current()
        if not env.distributed:
            return cls(DistEnv(device=dev))
        barrier()
        return cls(env)

    @classmethod
    def current(cls) -> "Runtime":
        """The runtime of the process group joined last (one CPU process before any)."""
        return cls(current())

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def writes(self) -> bool:
        """True on the rank that writes traces, metrics and reports (rank 0)."""
        return self.env.is_main

    def wrap_task(self, task: Any, mode: str) -> nn.Module:
        """Make ``task`` data-parallel in place (see :func:`~graftlab.distributed.distribute_task`);
        returns the user's module, whose names the groups and kinds carry."""
        return distribute_task(task, mode, self.env)

    def mean(self, value: Tensor) -> Tensor:
        """Mean over ranks of a per-rank tensor; every rank must call it."""
        return global_mean(value, self.env)

    def barrier(self) -> None:
        barrier()

    def main_only(self, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``factory(*args, **kwargs)`` on the writing rank; a do-nothing stand-in elsewhere."""
        return factory(*args, **kwargs) if self.writes else _Nothing()

    def checkpoints(self, config: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None) -> tuple[Optional[Checkpoints], int]:
        """``(Checkpoints or None, steps already done)`` for the run; loads the newest checkpoint
        when ``config.resume`` (see :func:`~graftlab.distributed.checkpoints_for`)."""
        return checkpoints_for(config, model, optimizer, scheduler)

    def resume_step(self, config: Any) -> int:
        """Steps done by the checkpoint a resumed run will load (0 when not resuming)."""
        return resume_step(config)
