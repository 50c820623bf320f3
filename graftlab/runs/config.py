"""The run configs as dataclasses, each with its ``validate()`` and ``resolve()``: :class:`RunConfig`
(what every run has), :class:`TrainConfig` (one optimizer), :class:`RecordConfig` (M#D and the trace).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import torch

from graftlab.runs.resume_check import check_resumable
from graftlab.distributed.env import MODES
from graftlab.distill.divergence import ON_DIVERGENCE
from graftlab.errors import GraftlabError, OutputExistsError
from graftlab.graft.optimizers import make_optimizer
from graftlab.trace.outputs import check_output
from graftlab.record.recorder import DEFAULT_FLUSH_EVERY
from graftlab.trace import is_trace
from graftlab.schedules import SCHEDULES, make_schedule
from graftlab.tasks import SIZES, TASKS, Task, resolve_device

DEFAULT_STEPS = 300
GRANULARITIES = ("layer", "global", "coordinate", "head", "vocab")


def max_threads() -> int:
    """The most CPU threads a run may ask for: 16 per core (torch.set_num_threads(100000) crashes
    the process instead of refusing)."""
    return 16 * (os.cpu_count() or 1)


@dataclass
class RunConfig:
    """The fields every run shares; see :class:`TrainConfig` and :class:`RecordConfig`."""

    # --- what to train ---
    task: str = "bert"  # built-in task: bert | resnet
    size: str = "tiny"  # tiny (CPU, ~1 min) | small | base (BERT-base / full-width ResNet-18)
    data: Optional[str] = None  # None: bundled data (KJV text / Fashion-MNIST); else a user's file or folder
    # --- how long ---
    steps: Optional[int] = None  # optimizer steps; None: from `epochs`, or 300 when neither is set
    epochs: Optional[float] = None  # passes over the training set (alternative to `steps`)
    batch_size: int = 32
    # --- schedule (a factor on the lr per step) ---
    schedule: Optional[str] = None  # constant | poly | step | cosine; None: the task's default (bert: poly, resnet: step)
    warmup: Optional[float] = None  # warmup steps (>= 1) or fraction of the run (< 1); None: task default
    power: float = 1.0  # poly decay power (1: BERT's linear decay)
    milestones: list = field(default_factory=lambda: [0.5, 0.75])  # step schedule: x gamma at these fractions
    gamma: float = 0.1  # step schedule decay factor
    # --- system ---
    device: str = "auto"  # cpu | cuda | auto
    parallel: str = "ddp"  # under torchrun: ddp (replicated) | fsdp (FSDP2 sharding); see docs/distributed.md
    checkpoint_dir: Optional[str] = None  # torch.distributed.checkpoint directories step-<N> go here
    checkpoint_every: int = 0  # save every N steps (0: only at the end when checkpoint_dir is set);
    # without checkpoint_dir and with on_divergence="restart": steps between in-memory restart points (0: 100)
    resume: bool = False  # continue from the newest checkpoint in checkpoint_dir (any number of processes)
    seed: int = 0  # seeds model init, data order, masking and dropout
    # CPU threads for PyTorch; None: PyTorch's default (the core count). 1 by default: on a shared,
    # loaded machine PyTorch's threads wait on each other (bert tiny, 2 cores at load 15-18: 0.9-1.0
    # steps/s with 1 thread, 0.1-0.8 with 2); on an idle machine pass its core count
    threads: Optional[int] = 1
    # --- evaluation and logging ---
    eval_every: int = 100  # evaluate on held-out data every N steps (0: only at the end)
    eval_size: Optional[int] = None  # held-out sequences/images per evaluation; None: task default
    log_every: int = 50  # steps between host syncs for the progress bar
    metrics: Optional[str] = None  # Parquet file for per-step loss, lr and eval metrics; None: not written
    # --- divergence (every step is checked for a non-finite loss/gradient, without a host sync) ---
    on_divergence: str = "stop"  # stop | restart (from the last good checkpoint or in-memory snapshot)
    divergence_lr_factor: float = 0.5  # each restart multiplies the learning rate by this (0 < f < 1)
    max_restarts: int = 3  # restarts before the run stops anyway

    def validate(self, *, overwrite: bool = False, outputs: bool = True,
                 inputs: Sequence[tuple[str, Optional[str | os.PathLike]]] = ()) -> None:
        """Check every field and output path; raises :class:`GraftlabError` (nothing is written).

        An existing output (``metrics``; a trace ``out``) is an :class:`OutputExistsError` unless
        ``overwrite``; an output may not be a file the run reads (``data``, or the ``inputs``
        given as ``(name, path)`` pairs: a config or corrections file), lie inside a trace folder,
        or sit below a regular file. ``outputs=False`` leaves the output paths to the caller (a
        folder it creates).
        """
        self.validate_loop()
        self._validate_task()
        self._validate_optimizers()
        if outputs:
            self._validate_outputs(overwrite, [("data", self.data), *inputs])

    def validate_loop(self) -> None:
        """The checks :func:`graftlab.runs.fit` needs for any task: length, schedule, loop settings."""
        if self.steps is not None and self.epochs is not None:
            raise GraftlabError("give either steps or epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise GraftlabError(f"the run needs at least one step, got steps={self.steps}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise GraftlabError(f"epochs must be a finite number > 0, got {self.epochs}")
        for name in ("power", "gamma", "warmup"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise GraftlabError(f"{name} must be a finite number, got {value}")
        if any(not math.isfinite(m) for m in self.milestones):
            raise GraftlabError(f"milestones must be finite fractions of the run, got {self.milestones}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise GraftlabError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.epochs is None:  # the length is known before the task: check the schedule against it
            self.check_schedule(self.steps or DEFAULT_STEPS)
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise GraftlabError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise GraftlabError(f"log_every must be >= 1, got {self.log_every}")
        if self.threads is not None and self.threads < 1:
            raise GraftlabError(f"threads must be at least 1, got {self.threads}")
        if self.threads is not None and self.threads > max_threads():
            raise GraftlabError(f"threads must be at most {max_threads()} (16 per CPU core here), got {self.threads}")
        if not 0 <= self.seed < 2**63:
            raise GraftlabError(f"seed must be a whole number in [0, 2**63), got {self.seed}")
        if self.checkpoint_dir is None:
            if self.resume:
                raise GraftlabError("resume=True needs checkpoint_dir (the checkpoints to resume from)")
            if self.checkpoint_every and self.on_divergence != "restart":  # restart: in-memory snapshots
                raise GraftlabError("checkpoint_every needs checkpoint_dir (where the checkpoints go)")
        self._validate_divergence()

    def _validate_divergence(self) -> None:
        if self.on_divergence not in ON_DIVERGENCE:
            raise GraftlabError(f"unknown on_divergence {self.on_divergence!r}: choose {' or '.join(ON_DIVERGENCE)}")
        factor = self.divergence_lr_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
            raise GraftlabError(f"divergence_lr_factor must be a number between 0 and 1 (exclusive), got {factor!r}")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise GraftlabError(f"max_restarts must be a whole number >= 0, got {self.max_restarts!r}")

    def check_schedule(self, steps: int) -> None:
        """Build the lr schedule for ``steps`` to check its settings (with the schedule and warmup
        given, or only the warmup while the task's default schedule is not known yet). The poly
        and step settings are checked whichever schedule runs: the task's default is one of them,
        and a nonsense value is a mistake even where unused."""
        for name in dict.fromkeys([self.schedule or "constant", "poly", "step"]):
            make_schedule(name, steps, self.warmup or 0.0, power=self.power, milestones=self.milestones,
                          gamma=self.gamma)

    def _validate_task(self) -> None:
        if self.task not in TASKS:
            raise GraftlabError(f"unknown task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.size not in SIZES:
            raise GraftlabError(f"unknown size {self.size!r}: choose one of {', '.join(SIZES)}")
        if self.data is not None and not Path(self.data).expanduser().exists():
            raise GraftlabError(f"data {self.data!r} does not exist")
        if self.batch_size < 1:
            raise GraftlabError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.eval_size is not None and self.eval_size < 1:
            raise GraftlabError(f"eval_size must be at least 1, got {self.eval_size}")
        if self.parallel not in MODES:
            raise GraftlabError(f"unknown parallel mode {self.parallel!r}: expected one of {', '.join(MODES)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device).strip().lower()):
            raise GraftlabError(f"unknown device {self.device!r}: choose cpu, cuda, cuda:N or auto")
        resolve_device(self.device)

    def _validate_optimizers(self) -> None:
        """Subclasses check their optimizer names, learning rates and hyperparameters."""

    def _validate_outputs(self, overwrite: bool, inputs: list) -> None:
        out = getattr(self, "out", None)  # a trace folder this run creates: nothing else goes in it
        metrics = check_output(self.metrics, "metrics file", overwrite=overwrite, inputs=inputs, new_traces=[out],
                               may_exist=self.resume)
        if metrics is not None and self.resume:  # continued, if it is this run's (graftlab.runs.metrics)
            from graftlab.runs.metrics import resumed_metrics

            resumed_metrics(metrics, dataclasses.asdict(self), overwrite)
        check_output(self.checkpoint_dir, "checkpoint_dir", folder=True, inputs=inputs, new_traces=[out])

    def resolve(self, task: Task) -> "RunConfig":
        """A copy with ``steps``, ``schedule``, ``warmup`` (and learning rates) left as None filled
        with ``task``'s defaults; the resolved schedule is checked."""
        changes: dict[str, Any] = {"steps": total_steps(self, task), "epochs": None}
        if self.schedule is None:
            changes["schedule"] = task.default_schedule
        if self.warmup is None:
            changes["warmup"] = task.default_warmup
        out = dataclasses.replace(self, **changes)
        out.check_schedule(out.steps)
        return out


@dataclass
class TrainConfig(RunConfig):
    """A plain run: one optimizer (``graftlab train``; with a corrections file, per-layer factors)."""

    # sgd | adam | adamw | adagrad | rmsprop; None: D's optimizer of a corrections file, else adam
    optimizer: Optional[str] = None
    lr: Optional[float] = None  # peak learning rate; None: the task's default for this optimizer
    hparams: dict = field(default_factory=dict)  # optimizer hyperparameters, e.g. {"momentum": 0.9}

    def _validate_optimizers(self) -> None:
        _check_optimizer(self.optimizer or "adam", self.lr, self.hparams, "lr")

    def resolve(self, task: Task) -> "TrainConfig":
        out = super().resolve(task)
        if out.optimizer is None:
            out = dataclasses.replace(out, optimizer="adam")
        return out if out.lr is not None else dataclasses.replace(out, lr=task.default_lr(out.optimizer))


@dataclass
class RecordConfig(RunConfig):
    """A grafted run M#D that records every group's ratio to a trace (``graftlab record``)."""

    magnitude: str = "adam"  # M: gives the step size (the schedule is attached here)
    direction: str = "sgd"  # D: gives the direction
    magnitude_lr: Optional[float] = None  # None: the task's default for M's optimizer
    direction_lr: Optional[float] = None  # None: the task's default for D's optimizer
    m_hparams: dict = field(default_factory=dict)  # M's hyperparameters, e.g. {"betas": (0.9, 0.98)}
    d_hparams: dict = field(default_factory=dict)  # D's hyperparameters, e.g. {"momentum": 0.9}
    granularity: str = "layer"  # layer | global | coordinate | head | vocab
    row_block: int = 1  # vocab: vocabulary rows per group
    out: Optional[str] = None  # trace directory
    every: int = 1  # record every k-th step
    flush_every: int = DEFAULT_FLUSH_EVERY  # recorded steps per part file

    def _validate_optimizers(self) -> None:
        _check_optimizer(self.magnitude, self.magnitude_lr, self.m_hparams, "magnitude_lr")
        _check_optimizer(self.direction, self.direction_lr, self.d_hparams, "direction_lr")
        if self.granularity not in GRANULARITIES:
            raise GraftlabError(f"unknown granularity {self.granularity!r}: choose {', '.join(GRANULARITIES)}")
        if isinstance(self.row_block, bool) or not isinstance(self.row_block, int) or self.row_block < 1:
            raise GraftlabError(f"row_block must be a positive int, got {self.row_block!r}")
        if self.every < 1 or self.flush_every < 1:
            raise GraftlabError(f"every and flush_every must be >= 1, got {self.every} and {self.flush_every}")
        if self.steps is not None and self.every > self.steps:
            raise GraftlabError(f"every={self.every} is more than steps={self.steps}: the trace would hold step 0 "
                                "only; choose every <= steps")

    def _validate_outputs(self, overwrite: bool, inputs: list) -> None:
        super()._validate_outputs(overwrite, inputs)
        if self.out is None:
            raise GraftlabError("out is required: the trace directory to write")
        path = Path(self.out).expanduser()
        check_output(path, "out", folder=True, inputs=inputs, may_exist=True, trace=True)
        if not path.is_dir() or not _has_entries(path):
            return
        if not is_trace(path):  # whatever overwrite says: only a trace is ever replaced
            raise GraftlabError(f"out {str(path)!r} is a folder that does not hold a graftlab trace: choose "
                                "another path (a new or empty folder)")
        if not (overwrite or self.resume):
            raise OutputExistsError(path, "trace")
        from graftlab.trace.lock import check_unlocked

        check_unlocked(path)
        if self.resume:
            check_resumable(self, path, overwrite, steps=self.steps or DEFAULT_STEPS)

    def resolve(self, task: Task) -> "RecordConfig":
        out = super().resolve(task)
        lrs = {name: task.default_lr(opt) for name, opt in
               (("magnitude_lr", out.magnitude), ("direction_lr", out.direction)) if getattr(out, name) is None}
        out = dataclasses.replace(out, **lrs) if lrs else out
        if out.every > out.steps:  # steps from epochs, known only now
            raise GraftlabError(f"every={out.every} is more than the run's {out.steps} steps: the trace would hold "
                                "step 0 only; choose a smaller every")
        return out


C = TypeVar("C", bound=RunConfig)

def _check_optimizer(name: str, lr: Optional[float], hparams: dict, lr_field: str) -> None:
    if lr is not None and not (math.isfinite(lr) and lr >= 0):
        raise GraftlabError(f"{lr_field} must be a finite number >= 0, got {lr}")
    for key, value in hparams.items():
        _check_hparam(name, key, value)
    # on one throwaway parameter, the optimizer's own checks of names and ranges run before the task is built
    try:
        make_optimizer(name, [torch.zeros(1, requires_grad=True)], 0.0 if lr is None else lr, **hparams)
    except GraftlabError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as err:
        raise GraftlabError(f"{name}: {err}") from None


def _check_hparam(optimizer: str, key: str, value: Any) -> None:
    """A hyperparameter value is a finite number, a boolean, None, or (``betas``) two numbers."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or v is None:
            continue
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise GraftlabError(f"{optimizer} hyperparameter {key} must be finite numbers, got {value!r}")
    if key == "betas" and (not isinstance(value, (list, tuple)) or len(value) != 2):
        raise GraftlabError(f"{optimizer} hyperparameter betas needs two numbers (e.g. 0.9,0.999), got {value!r}")
    if key != "betas" and isinstance(value, (list, tuple)):
        raise GraftlabError(f"{optimizer} hyperparameter {key} takes one value, got {value!r}")


def _has_entries(path: Path) -> bool:
    from graftlab.trace.lock import LOCK_NAME

    return any(p.name != LOCK_NAME for p in path.iterdir())


def check_output_file(path: Optional[str | os.PathLike], what: str, overwrite: bool) -> Optional[Path]:
    """The path of an output file to write, or None; see :func:`graftlab.trace.outputs.check_output`."""
    return check_output(path, what, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------
# Resolving defaults


def total_steps(config: RunConfig, task: Task) -> int:
    """Steps for the run: ``steps``, or ``epochs`` x steps per epoch, or :data:`DEFAULT_STEPS`."""
    if config.steps is not None and config.epochs is not None:
        raise GraftlabError("give either steps or epochs, not both")
    if config.steps is not None:
        steps = int(config.steps)
    elif config.epochs is not None:
        if not config.epochs > 0:
            raise GraftlabError(f"epochs must be > 0, got {config.epochs}")
        steps = int(round(config.epochs * task.steps_per_epoch))
    else:
        steps = DEFAULT_STEPS
    if steps < 1:
        raise GraftlabError(f"the run needs at least one step, got {steps}")
    return steps


def resolve_config(config: C, task: Task) -> C:
    """``config.resolve(task)``: defaults left as None filled from the task (see :meth:`RunConfig.resolve`)."""
    return config.resolve(task)
