"""The training loop every run shares: :func:`fit` a task's model with any optimizer.

    task = get_task("bert", size="tiny", batch_size=32, seed=0, device="cpu")
    graft = Graft(adam, sgd, names=task.model)
    result = fit(cfg, task, graft, schedule_owner=adam, on_step=lambda step, loss: rec.log(loss=loss))

``fit`` reads top-down: check the config, attach the lr schedule, seed, resume from a checkpoint,
run the steps (:class:`_Loop`), then build the metrics table and write it.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.optim import Optimizer

from graftlab.io import termination
from graftlab.runs.config import RunConfig, check_output_file, resolve_config
from graftlab.runs.resume_check import check_resumed_schedule
from graftlab.distributed.runtime import Runtime
from graftlab.distill.divergence import RESTART_COLUMN
from graftlab.errors import DivergedError, GraftlabError
from graftlab.names import unwrap
from graftlab.graft.optimizers import describe
from graftlab.runs.divergence import Divergence, Restart
from graftlab.runs.restarts import Guard
from graftlab.runs.metrics import METRICS_FORMAT, continued, resumed_metrics, write_metrics
from graftlab.graft.schedules import Product, make_schedule
from graftlab.tasks import Task

Factor = Callable[[int], float]


@dataclass
class FitResult:
    final: dict[str, float]  # final held-out evaluation ({"loss", "accuracy"})
    metrics: pd.DataFrame  # one row per step: step, loss, lr, eval_* where evaluated
    wall_time: float  # seconds for the whole run, evaluations included
    steps_per_second: float  # training steps per second, evaluations excluded
    steps: int  # steps done (fewer than asked when the run stopped on a divergence)
    diverged_at: Optional[int] = None  # first non-finite step, when the run stopped on it
    path: Optional[str] = None  # metrics file written, if any
    optimizer: Optional[Optimizer] = field(default=None, repr=False)  # the trained optimizer (state, lrs)
    divergence: Optional[Divergence] = None  # what stopped the run (loss/groups, steps), if anything did
    restarts: list[Restart] = field(default_factory=list)  # restarts after divergences, in order
    lr_scale: float = 1.0  # factor the restarts left on the schedule owner's learning rate
    resumed_at: int = 0  # steps done by the checkpoint this process resumed from (wall_time, steps_per_second: its own)
    model: Optional[Any] = field(default=None, repr=False)  # the trained model (unwrapped from DDP/compile)

    def raise_if_diverged(self) -> None:
        """A :class:`~graftlab.errors.DivergedError` (one line) when the run stopped on a divergence."""
        if self.divergence is None:
            return
        what = self.divergence.message()
        if self.restarts:
            what += f" (after {len(self.restarts)} restart{'s' if len(self.restarts) > 1 else ''}, lr x{self.lr_scale:g})"
            hint = "a smaller lr or more {max_restarts} may help"
        else:
            hint = "pass {on_divergence=restart} to restart with a smaller learning rate"
        raise DivergedError(f"{what}; stopped after step {self.divergence.detected}; {hint}",
                            param=("max_restarts", "on_divergence"))


def fit(
    config: RunConfig,
    task: Task,
    optimizer: Optimizer,
    *,
    schedule_owner: Optimizer,
    lr_factor: Optional[Union[Factor, list[Factor]]] = None,
    on_step: Optional[Callable[[int, Tensor], None]] = None,
    on_restart: Optional[Callable[[Restart], None]] = None,
    metrics_path: Optional[str | os.PathLike] = None,
    progress: bool = True,
    overwrite: bool = False,
    metadata: Optional[dict[str, Any]] = None,
    runtime: Optional[Runtime] = None,
) -> FitResult:
    """Train ``task.model`` with ``optimizer`` for the config's steps; evaluate; write metrics.

    ``schedule_owner`` gets a ``LambdaLR`` of ``config.schedule`` (times ``lr_factor(step)`` when
    given; a list gives one factor per param group of ``schedule_owner``, as per-group corrections
    schedules need): the plain optimizer, or a ``Graft``'s magnitude child. ``on_step(step, loss)`` runs after
    every optimizer step with the loss as a device tensor (0-based ``step``). Losses stay on the device
    and are read every ``config.log_every`` steps for the progress line. Every step is checked for
    a non-finite loss, gradient (a Graft: step norm) without a host sync
    (:mod:`graftlab.runs.divergence`); the run then stops within one step (``diverged_at``,
    ``divergence``), or with ``config.on_divergence="restart"`` goes back to its last good state
    with the learning rate x ``config.divergence_lr_factor``, at most ``config.max_restarts`` times,
    calling ``on_restart(restart)`` after the state is restored; the metrics then get a ``restart``
    column (restarts before each step). Evaluation runs every ``config.eval_every`` steps and at the end; an eval
    value in row ``s`` measures the model after step ``s``. ``metrics_path`` (default
    ``config.metrics``) gets a Parquet file with the config in its metadata; an existing file is a
    GraftlabError unless ``overwrite``. ``runtime`` (default: this process's) says whether this rank
    writes, averages losses over ranks and holds the checkpoints of ``config.checkpoint_dir``.
    """
    config.validate_loop()
    path = check_output_file(config.metrics if metrics_path is None else metrics_path, "metrics file",
                             overwrite or config.resume)
    config = resolve_config(config, task)
    # a resumed run continues its own metrics file (checked before any step, replaced only whole at the end)
    prior = resumed_metrics(path, asdict(config), overwrite) if path is not None and config.resume else None
    if prior is None and path is not None and config.resume and path.exists():
        overwrite = True  # another run's file, which resumed_metrics lets go only with overwrite
    rt = runtime or Runtime.current()
    scheduler, factor = _lr_schedule(config, schedule_owner, lr_factor)
    _seed_and_threads(config)
    task.model.train()
    note = check_resumed_schedule(config)  # before the checkpoint is loaded: a refusal changes nothing
    if note and rt.writes:
        print(note, file=sys.stderr, flush=True)
    ckpt, first = rt.checkpoints(config, task.model, optimizer, scheduler)  # first > 0: resumed
    if prior is not None:
        _note_metrics_gap(prior, first, path, rt)
        overwrite = True
    batches = _batches_from(task, first)
    base_lr = float(schedule_owner.defaults["lr"])
    guard = Guard(config, task.model, optimizer, scheduler, task.device, rt.env.distributed, ckpt, first, on_restart)
    loop = _Loop(config, task, optimizer, scheduler, rt, on_step, guard,
                 lrs=lambda step: base_lr * factor(step), first=first)
    if first >= config.steps and rt.writes:  # resumed from the final checkpoint: only the end evaluation is left
        print(f"the run is already complete at step {first}", file=sys.stderr, flush=True)
    bar = _Progress(config.steps, progress and rt.writes and first < config.steps,
                    f"{task.name}/{task.size} {type(optimizer).__name__}")
    bar.rewind(first)  # a resumed run's bar starts at its checkpoint's step
    termination.watch(loop)  # SIGTERM unwinds like Ctrl-C, so the steps run get their metrics
    try:
        loop.run(batches, bar)
    except (KeyboardInterrupt, SystemExit) as stop:
        if isinstance(stop, SystemExit) and stop.code != termination.EXIT_CODE or rt.env.distributed:
            raise  # an exit asked for, or ranks that may be gone: no collective for the metrics
        bar.close()
        with termination.deferred():  # a second SIGTERM does not cut the metrics file in half
            stop.fit_result = _finish(config, task, optimizer, loop, guard, rt, path, metadata, overwrite,
                                      interrupted=True, prior=prior)
        raise
    finally:
        bar.close()
        termination.unwatch(loop)
    return _finish(config, task, optimizer, loop, guard, rt, path, metadata, overwrite, prior=prior)


def _finish(config: RunConfig, task: Task, optimizer: Optimizer, loop: "_Loop", guard: Guard, rt: Runtime,
            path: Any, metadata: Optional[dict[str, Any]], overwrite: bool, interrupted: bool = False,
            prior: Optional[pd.DataFrame] = None) -> FitResult:
    """The result of the steps ``loop`` ran (all, up to a divergence, or up to an interruption),
    with its metrics file written (after ``prior``'s rows before the resumed step)."""
    wall = time.perf_counter() - loop.start
    rate = loop.executed / max(loop.train_time or wall - loop.eval_time, 1e-9)
    stopped = loop.diverged
    frame = continued(prior, loop.first, loop.frame())
    result = FitResult(loop.final, frame, wall, rate, loop.done, stopped.step if stopped else None,
                       str(path) if path else None, optimizer, stopped, list(guard.restarts), guard.lr_scale,
                       loop.first, unwrap(task.model))
    if path is not None and rt.writes:
        meta = {**_metrics_meta(config, task, optimizer, result, metadata), "divergence": guard.report(stopped)}
        if interrupted:
            meta["interrupted"] = True  # stopped by Ctrl-C or SIGTERM: no final evaluation
        if loop.first:
            meta["resumed_at"] = loop.first  # rows before it: the run's earlier process, when its file was there
        write_metrics(path, result.metrics, meta, overwrite)
    return result


def _note_metrics_gap(prior: pd.DataFrame, first: int, path: Any, rt: Runtime) -> None:
    """One stderr line when the continued metrics file lacks steps before the resumed step (the
    earlier process was killed before it wrote them): the file will not have those rows."""
    steps = prior["step"] if "step" in prior.columns else pd.Series([], dtype="int64")
    have = int((steps < first).sum())
    if have < first and rt.writes:
        import sys

        print(f"metrics file {path}: continued at step {first}, but it holds {have} of the {first} steps before it "
              "(the earlier run stopped before writing them)", file=sys.stderr, flush=True)


def _lr_schedule(config: RunConfig, owner: Optimizer, lr_factor: Optional[Union[Factor, list[Factor]]]):
    """``(LambdaLR on owner, factor of the lr column)``: the run's schedule, times ``lr_factor``."""
    schedule = make_schedule(config.schedule, config.steps, config.warmup, power=config.power,
                             milestones=config.milestones, gamma=config.gamma)
    if isinstance(lr_factor, (list, tuple)):
        if len(lr_factor) != len(owner.param_groups):
            raise GraftlabError(f"{len(lr_factor)} lr factors for {len(owner.param_groups)} param groups of the optimizer")
        factor, lambdas = schedule, [Product(schedule, f) for f in lr_factor]
    else:
        factor = lambdas = Product(schedule, lr_factor)
    return torch.optim.lr_scheduler.LambdaLR(owner, lambdas), factor


def _batches_from(task: Task, done: int) -> Iterator[Any]:
    """The task's training batches from step ``done`` on: the data order of an uninterrupted run."""
    batches = task.train_batches()
    for _ in range(done):
        next(batches)
    return batches


def _seed_and_threads(config: RunConfig) -> None:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # dropout and anything else drawing from the global generator


class _Loop:
    """The steps of one run. Losses stay in a device tensor; the host reads their mean once per
    ``log_every`` steps (progress line), never per step; the divergence check (``guard``) reads one
    flag per step without waiting for the device."""

    def __init__(self, config: RunConfig, task: Task, optimizer: Optimizer, scheduler: Any, runtime: Runtime,
                 on_step: Optional[Callable[[int, Tensor], None]], guard: Guard, *, lrs: Factor, first: int) -> None:
        self.config, self.task, self.optimizer, self.scheduler = config, task, optimizer, scheduler
        self.rt, self.on_step, self.guard, self.lr_at = runtime, on_step, guard, lrs
        self.first = self.done = self.logged = first
        self.executed = 0  # steps run, the ones run again after a restart included
        self.losses = torch.zeros(config.steps, dtype=torch.float32, device=task.device)
        self.lrs = np.empty(config.steps, dtype=np.float64)
        self.restart_of = np.zeros(config.steps, dtype=np.int64)  # restarts before each step
        self.evals: dict[int, dict[str, float]] = {}
        self.diverged: Optional[Divergence] = None
        self.eval_time = self.train_time = 0.0
        self.final: dict[str, float] = {}
        self.start = time.perf_counter()

    def run(self, batches: Iterator[Any], bar: "_Progress") -> None:
        cfg = self.config
        self.start = time.perf_counter()
        step = self.first
        while step < cfg.steps:
            self._step(step, next(batches))
            bar.advance()
            done = step + 1
            last, log = done == cfg.steps, done % cfg.log_every == 0
            evaluate = bool(cfg.eval_every) and done % cfg.eval_every == 0 and not last
            # wait for the flags only where the host syncs anyway or must know: saves, evaluations, the end
            found = self.guard.poll(wait=last or log or evaluate or self.guard.due(done, last))
            if found is not None:
                step = self._after_divergence(found, bar)
                if step is None:
                    break
                batches = _batches_from(self.task, step)
                continue
            self.guard.save(done, last)
            if log or last:
                self._log(bar)
            if evaluate:
                self._evaluate(step, bar)
            step = done
        if self.task.device.type == "cuda":
            torch.cuda.synchronize(self.task.device)
        self.train_time = time.perf_counter() - self.start - self.eval_time
        self.final = self.task.evaluate(self.task.model)
        self.evals[self.done - 1] = self.final

    def _step(self, step: int, batch: Any) -> None:
        self.lrs[step] = self.lr_at(step) * self.guard.lr_scale
        self.restart_of[step] = self.guard.count
        loss = self.task.loss(self.task.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        self.losses[step] = loss
        self.optimizer.step()
        # the update (and the Recorder's row) is in: a Ctrl-C or SIGTERM from here on counts the step
        self.done = step + 1
        self.executed += 1
        self.scheduler.step()
        self.guard.observe(step, loss)
        if self.on_step is not None:
            self.on_step(step, loss)

    def _log(self, bar: "_Progress") -> None:
        # the one host sync per logging interval; the mean over ranks (a collective: every rank calls it)
        mean = self.rt.mean(self.losses[self.logged : self.done].mean()).item()
        self.logged = self.done
        bar.update(mean, self.executed / max(time.perf_counter() - self.start - self.eval_time, 1e-9))

    def _after_divergence(self, found: Divergence, bar: "_Progress") -> Optional[int]:
        """Restart (the step to run next) or stop (None) after ``found``."""
        from rich.markup import escape  # group names are data: "[/]" is a name, not markup

        step = self.guard.restart(found)
        if step is None:
            self.diverged = found
            bar.print(f"[red]{escape(found.message())}: stopping after step {found.detected}")
            return None
        event = self.guard.restarts[-1]
        bar.print(f"[yellow]{escape(found.message())}: restart {event.count} of {self.guard.max_restarts} from step "
                  f"{step} with the lr x{event.lr_scale:g}")
        self.done = self.logged = step
        self.evals = {s: v for s, v in self.evals.items() if s < step}
        bar.rewind(step)
        return step

    def _evaluate(self, step: int, bar: "_Progress") -> None:
        t0 = time.perf_counter()
        self.evals[step] = self.task.evaluate(self.task.model)
        self.eval_time += time.perf_counter() - t0
        bar.print(f"step {self.done}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in self.evals[step].items()))

    def frame(self) -> pd.DataFrame:
        """One row per step run: ``step``, ``loss`` (the global batch's, under torchrun), ``lr``, ``eval_*``."""
        first, done = self.first, self.done
        losses = self.rt.mean(self.losses)  # every rank calls it: a collective under torchrun
        frame = pd.DataFrame({"step": np.arange(first, done, dtype=np.int64),
                              "loss": losses[first:done].cpu().numpy(), "lr": self.lrs[first:done]})
        keys = list(self.final) or list(dict.fromkeys(k for values in self.evals.values() for k in values))
        for key in keys:
            column = np.full(done - first, np.nan)
            for s, values in self.evals.items():
                if first <= s < done:  # a run resumed from its final checkpoint has no row for its end
                    column[s - first] = values.get(key, np.nan)
            frame[f"eval_{key}"] = column
        if self.guard.mode == "restart":
            frame[RESTART_COLUMN] = self.restart_of[first:done]
        return frame


def _metrics_meta(config: RunConfig, task: Task, optimizer: Optimizer, result: FitResult,
                  extra: Optional[dict[str, Any]]) -> dict[str, Any]:
    import graftlab

    return {
        "format": METRICS_FORMAT,
        "config": asdict(config),
        "task": task.info(),
        "optimizer": describe(optimizer),
        "final": result.final,
        "steps": result.steps,
        "diverged_at": result.diverged_at,
        "wall_time": result.wall_time,
        "steps_per_second": result.steps_per_second,
        "device": str(task.device),
        "graftlab_version": graftlab.__version__,
        "torch_version": torch.__version__,
        **(extra or {}),
    }


class _Progress:
    """Rich progress bar (step, loss, steps/s) that is a no-op when disabled."""

    def __init__(self, total: int, enabled: bool, description: str):
        self.enabled = enabled
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"), TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task(description, total=total, loss="-", rate="-")
        self.bar.start()

    def advance(self) -> None:
        if self.enabled:
            self.bar.advance(self.task)

    def rewind(self, completed: int) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=completed)

    def update(self, loss: float, rate: float) -> None:
        if self.enabled:
            self.bar.update(self.task, loss=f"{loss:.4f}", rate=f"{rate:.1f}")

    def print(self, text: str) -> None:
        if self.enabled:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
