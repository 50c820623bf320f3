"""The training loop shared by ``graftlab record`` and ``graftlab train``, and the plain trainer.

    >>> cfg = TrainConfig(task="bert", optimizer="sgd", lr=0.1, hparams={"momentum": 0.9}, steps=300)
    >>> result = train(cfg)                                  # the plain baseline
    >>> result = train(cfg, corrections="corrections.json")  # SGD with distilled per-layer factors
    >>> result.final                                         # {"loss": ..., "accuracy": ...}

A grafted run builds its own optimizer and calls :func:`fit` directly, with the magnitude child as
``schedule_owner`` (its learning rate is the step size)::

    task = get_task(cfg.task, size=cfg.size, batch_size=cfg.batch_size, seed=cfg.seed, device="cpu")
    graft = Graft(adam, sgd, names=task.model)
    fit(cfg, task, graft, schedule_owner=graft.magnitude, on_step=recorder_callback)

Configs are flat dataclasses (nanoGPT style); ``load_config`` reads one from YAML or TOML and
``make_config`` layers command-line values over a file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import tomllib
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.optim import Optimizer

from graftlab import distributed as gd
from graftlab.errors import GraftlabError
from graftlab.optimizers import describe, make_optimizer, parse_hparams
from graftlab.schedules import make_schedule
from graftlab.tasks import Task, get_task, resolve_device

METRICS_FORMAT = "graftlab.metrics/1"
METADATA_KEY = b"graftlab.metrics"
DEFAULT_STEPS = 300


@dataclass
class TrainConfig:
    # --- what to train ---
    task: str = "bert"  # built-in task: bert | resnet
    size: str = "tiny"  # tiny (CPU, ~1 min) | small | base (BERT-base / full-width ResNet-18)
    data: Optional[str] = None  # None: bundled data (KJV text / Fashion-MNIST); else a user's file or folder
    # --- how long ---
    steps: Optional[int] = None  # optimizer steps; None: from `epochs`, or 300 when neither is set
    epochs: Optional[float] = None  # passes over the training set (alternative to `steps`)
    batch_size: int = 32
    # --- optimizer ---
    optimizer: str = "adam"  # sgd | adam | adamw | adagrad | rmsprop
    lr: Optional[float] = None  # peak learning rate; None: the task's default for this optimizer
    hparams: dict = field(default_factory=dict)  # optimizer hyperparameters, e.g. {"momentum": 0.9}
    # --- schedule (a factor on lr per step) ---
    schedule: Optional[str] = None  # constant | poly | step | cosine; None: the task's default (bert: poly, resnet: step)
    warmup: Optional[float] = None  # warmup steps (>= 1) or fraction of the run (< 1); None: task default
    power: float = 1.0  # poly decay power (1: BERT's linear decay)
    milestones: list = field(default_factory=lambda: [0.5, 0.75])  # step schedule: x gamma at these fractions
    gamma: float = 0.1  # step schedule decay factor
    # --- system ---
    device: str = "auto"  # cpu | cuda | auto
    parallel: str = "ddp"  # under torchrun: ddp (replicated) | fsdp (FSDP2 sharding); see docs/distributed.md
    checkpoint_dir: Optional[str] = None  # torch.distributed.checkpoint directories step-<N> go here
    checkpoint_every: int = 0  # save every N steps (0: only at the end when checkpoint_dir is set)
    resume: bool = False  # continue from the newest checkpoint in checkpoint_dir (any number of processes)
    seed: int = 0  # seeds model init, data order, masking and dropout
    threads: Optional[int] = None  # CPU threads for PyTorch; None: PyTorch's default (1 is far faster on a busy machine)
    # --- evaluation and logging ---
    eval_every: int = 100  # evaluate on held-out data every N steps (0: only at the end)
    eval_size: Optional[int] = None  # held-out sequences/images per evaluation; None: task default
    log_every: int = 50  # steps between host syncs for the progress bar and divergence check
    metrics: Optional[str] = None  # Parquet file for per-step loss, lr and eval metrics; None: not written


@dataclass
class FitResult:
    final: dict[str, float]  # final held-out evaluation ({"loss", "accuracy"})
    metrics: pd.DataFrame  # one row per step: step, loss, lr, eval_* where evaluated
    wall_time: float  # seconds for the whole run, evaluations included
    steps_per_second: float  # training steps per second, evaluations excluded
    steps: int  # steps run (fewer than asked when the loss diverged)
    diverged_at: Optional[int] = None  # first logging step whose mean loss was not finite
    path: Optional[str] = None  # metrics file written, if any
    optimizer: Optional[Optimizer] = field(default=None, repr=False)  # the trained optimizer (state, lrs)


C = TypeVar("C")

# ---------------------------------------------------------------------------------------------------
# Config files


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a value read from YAML/TOML or the command line to the field's declared type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None:
            if type(None) in args:
                return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if value is None:
        raise GraftlabError(f"config key {name!r} cannot be empty")
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            out = float(value)
            if math.isnan(out):
                raise ValueError(value)
            return out
        if hint is str:
            return str(value)
        if hint is dict or origin is dict:
            if isinstance(value, (list, tuple)):  # ["momentum=0.9", ...]
                return parse_hparams([str(v) for v in value])
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        if hint is list or origin is list:
            if isinstance(value, str):
                value = value.split(",")
            return [float(v) for v in value]
    except (TypeError, ValueError):
        raise GraftlabError(f"config key {name!r}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def config_from_dict(values: dict[str, Any], cls: type[C] = TrainConfig) -> C:
    """Build config ``cls`` from a mapping; unknown keys are a GraftlabError listing the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise GraftlabError(f"unknown config key(s) {', '.join(unknown)}: valid keys are {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def load_config(path: str | os.PathLike, cls: type[C] = TrainConfig) -> C:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of config keys."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise GraftlabError(f"config file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            values = tomllib.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            raise GraftlabError(f"config file {str(p)!r} must end in .yaml, .yml or .toml")
    except GraftlabError:
        raise
    except Exception as err:  # the parsers' own syntax errors
        raise GraftlabError(f"cannot parse config file {str(p)!r}: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise GraftlabError(f"config file {str(p)!r} must hold a mapping of keys to values")
    return config_from_dict(values, cls)


def make_config(config_path: Optional[str | os.PathLike] = None, cls: type[C] = TrainConfig, **overrides: Any) -> C:
    """A config file (or the defaults) with every override that is not None applied on top.

    ``hparams`` overrides are merged into the file's hyperparameters (a list of ``key=value`` works).
    """
    base = load_config(config_path, cls) if config_path is not None else cls()
    values = asdict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "hparams":
            extra = parse_hparams(value) if isinstance(value, (list, tuple)) else dict(value)
            values["hparams"] = {**values.get("hparams", {}), **extra}
        else:
            values[key] = value
    return config_from_dict(values, cls)


# ---------------------------------------------------------------------------------------------------
# Resolving defaults


def total_steps(config: Any, task: Task) -> int:
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
    """Fill ``lr``, ``schedule``, ``warmup`` and ``steps`` left as None with the task's defaults."""
    changes: dict[str, Any] = {"steps": total_steps(config, task), "epochs": None}
    if getattr(config, "lr", "absent") is None:
        changes["lr"] = task.default_lr(config.optimizer)
    if config.schedule is None:
        changes["schedule"] = task.default_schedule
    if config.warmup is None:
        changes["warmup"] = task.default_warmup
    return dataclasses.replace(config, **changes)


def _check_output(path: Optional[str | os.PathLike], overwrite: bool) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.exists() and not overwrite:
        raise GraftlabError(f"metrics file {str(p)!r} already exists (use --overwrite to replace it)")
    if p.is_dir():
        raise GraftlabError(f"metrics path {str(p)!r} is a directory")
    return p


# ---------------------------------------------------------------------------------------------------
# Metrics files


def write_metrics(path: Path, frame: pd.DataFrame, metadata: dict[str, Any], overwrite: bool = False) -> None:
    """Write ``frame`` to Parquet with ``metadata`` (JSON) under key ``graftlab.metrics``; atomic."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists() and not overwrite:
        raise GraftlabError(f"metrics file {str(path)!r} already exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(metadata, default=str).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A metrics file written by :func:`fit`: ``(DataFrame, metadata)``."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:
        raise GraftlabError(f"cannot read metrics file {str(path)!r}: {err}") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise GraftlabError(f"{str(path)!r} is not a graftlab metrics file")
    return table.to_pandas(), json.loads(raw)


# ---------------------------------------------------------------------------------------------------
# The loop


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

    def update(self, loss: float, rate: float) -> None:
        if self.enabled:
            self.bar.update(self.task, loss=f"{loss:.4f}", rate=f"{rate:.1f}")

    def print(self, text: str) -> None:
        if self.enabled:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


class _Scaled:
    """``schedule(step) * factor(step)``; an object rather than a lambda so LambdaLR can save it."""

    def __init__(self, schedule: Callable[[int], float], factor: Optional[Callable[[int], float]]):
        self.schedule, self.factor = schedule, factor

    def __call__(self, step: int) -> float:
        f = self.schedule(step)
        return f if self.factor is None else f * self.factor(step)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(
    config: Any,
    task: Task,
    optimizer: Optimizer,
    *,
    schedule_owner: Optimizer,
    lr_factor: Optional[Callable[[int], float] | list[Callable[[int], float]]] = None,
    on_step: Optional[Callable[[int, Tensor], None]] = None,
    metrics_path: Optional[str | os.PathLike] = None,
    progress: bool = True,
    overwrite: bool = False,
    metadata: Optional[dict[str, Any]] = None,
) -> FitResult:
    """Train ``task.model`` with ``optimizer`` for the config's steps; evaluate; write metrics.

    ``schedule_owner`` gets a ``LambdaLR`` of ``config.schedule`` (times ``lr_factor(step)`` when
    given; a list gives one factor per param group of ``schedule_owner``, as per-group corrections
    schedules need): the plain optimizer, or a ``Graft``'s magnitude child. ``on_step(step, loss)`` runs after
    every optimizer step with the loss as a device tensor (0-based ``step``). Losses stay on the device
    and are read every ``config.log_every`` steps; a non-finite mean loss there stops the run
    (``diverged_at``). Evaluation runs every ``config.eval_every`` steps and at the end; an eval
    value in row ``s`` measures the model after step ``s``. ``metrics_path`` (default
    ``config.metrics``) gets a Parquet file with the config in its metadata; an existing file is a
    GraftlabError unless ``overwrite``.
    """
    if metrics_path is None:
        metrics_path = getattr(config, "metrics", None)
    path = _check_output(metrics_path, overwrite)
    config = resolve_config(config, task)
    steps = config.steps
    if config.eval_every < 0 or config.log_every < 1:
        raise GraftlabError("eval_every must be >= 0 and log_every >= 1")
    schedule = make_schedule(
        config.schedule, steps, config.warmup, power=config.power, milestones=config.milestones, gamma=config.gamma
    )
    if isinstance(lr_factor, (list, tuple)):
        if len(lr_factor) != len(schedule_owner.param_groups):
            raise GraftlabError(
                f"{len(lr_factor)} lr factors for {len(schedule_owner.param_groups)} param groups of the optimizer"
            )
        factor, lambdas = schedule, [_Scaled(schedule, f) for f in lr_factor]
    else:
        factor = lambdas = _Scaled(schedule, lr_factor)
    base_lr = float(schedule_owner.defaults["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(schedule_owner, lambdas)

    device, model = task.device, task.model
    threads = getattr(config, "threads", None)
    if threads is not None:
        if threads < 1:
            raise GraftlabError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)  # dropout and anything else drawing from the global generator
    model.train()
    batches = task.train_batches()
    ckpt, first = gd.checkpoints_for(config, model, optimizer, scheduler)  # first > 0: resumed
    for _ in range(first):
        next(batches)  # the data order of the uninterrupted run
    losses = torch.zeros(steps, dtype=torch.float32, device=device)
    lrs = np.empty(steps, dtype=np.float64)
    evals: dict[int, dict[str, float]] = {}
    bar = _Progress(steps, progress and gd.is_main(), f"{task.name}/{task.size} {type(optimizer).__name__}")
    diverged_at: Optional[int] = None
    eval_time, logged = 0.0, first
    start = time.perf_counter()
    done = first
    try:
        for step in range(first, steps):
            lrs[step] = base_lr * factor(step)
            loss = task.loss(model, next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss = loss.detach()
            losses[step] = loss
            if on_step is not None:
                on_step(step, loss)
            done = step + 1
            if ckpt is not None:
                ckpt.maybe_save(done, last=done == steps)
            bar.advance()
            if done % config.log_every == 0 or done == steps:
                # the one host sync per logging interval; the mean over ranks, so all stop together
                mean = gd.global_mean(losses[logged:done].mean()).item()
                logged = done
                rate = (done - first) / max(time.perf_counter() - start - eval_time, 1e-9)
                bar.update(mean, rate)
                if not math.isfinite(mean):
                    diverged_at = step
                    bar.print(f"[red]loss is not finite by step {step}: stopping")
                    break
            if config.eval_every and done % config.eval_every == 0 and done != steps:
                t0 = time.perf_counter()
                evals[step] = task.evaluate(model)
                eval_time += time.perf_counter() - t0
                bar.print(f"step {done}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in evals[step].items()))
        _sync(device)
        train_time = time.perf_counter() - start - eval_time
        final = task.evaluate(model)
        evals[done - 1] = final
    finally:
        bar.close()
    wall = time.perf_counter() - start

    losses = gd.global_mean(losses)  # per-step global-batch losses under torchrun
    frame = pd.DataFrame({"step": np.arange(first, done, dtype=np.int64), "loss": losses[first:done].cpu().numpy(),
                          "lr": lrs[first:done]})
    for key in final:
        column = np.full(done - first, np.nan)
        for s, values in evals.items():
            column[s - first] = values.get(key, np.nan)
        frame[f"eval_{key}"] = column
    rate = (done - first) / max(train_time, 1e-9)
    result = FitResult(final, frame, wall, rate, done, diverged_at, str(path) if path else None, optimizer)
    if path is not None and gd.is_main():
        import graftlab

        meta = {
            "format": METRICS_FORMAT,
            "config": asdict(config),
            "task": task.info(),
            "optimizer": describe(optimizer),
            "final": final,
            "steps": done,
            "diverged_at": diverged_at,
            "wall_time": wall,
            "steps_per_second": rate,
            "device": str(device),
            "graftlab_version": graftlab.__version__,
            "torch_version": torch.__version__,
            **(metadata or {}),
        }
        write_metrics(path, frame, meta, overwrite=overwrite)
    return result


def _correction_notes(corrections, config: TrainConfig) -> list[str]:
    """What a user should know before training with ``corrections`` under ``config``."""
    notes = []
    base = corrections.direction_lr
    if base is not None and not math.isclose(base, config.lr, rel_tol=1e-9):
        notes.append(f"factors are relative to lr {base:g} (D's lr when recorded); this run's base lr is {config.lr:g}")
    if corrections.schedule and (config.schedule != "constant" or config.warmup):
        notes.append(
            "the file holds schedules, which already contain the recorded run's warmup and decay; "
            f"this run also applies its own '{config.schedule}' schedule with warmup {config.warmup or 0:g} "
            "(use --schedule constant --warmup 0 to follow them alone)"
        )
    return notes


def train(
    config: TrainConfig,
    corrections: Optional[str | os.PathLike] = None,
    allow_missing: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FitResult:
    """Plain training of a built-in task: the baseline, or with a distilled corrections file.

    Static multipliers in ``corrections`` become per-tensor learning rates (base lr x factor), a
    schedule becomes an lr factor composed with the run's own schedule. Groups absent from the file
    are an error unless ``allow_missing`` (they keep factor 1, and the run says how many).
    """
    _check_output(config.metrics, overwrite)  # fail before building anything
    task = get_task(
        config.task, size=config.size, data=config.data, batch_size=config.batch_size, seed=config.seed,
        device=gd.setup(config.device), eval_size=config.eval_size,
    )
    config = resolve_config(config, task)
    named = list(gd.distribute_task(task, config.parallel).named_parameters())  # torchrun: DDP or FSDP2
    lr_factor, extra, params = None, {}, [p for _, p in named]
    if corrections is not None:
        from graftlab.corrections import apply, load_corrections

        loaded = load_corrections(corrections)
        applied = apply(loaded, named, config.lr, allow_missing=allow_missing)
        params = applied.param_groups
        notes = _correction_notes(loaded, config)
        if notes and progress:
            from rich.console import Console

            for note in notes:
                Console(stderr=True).print(f"corrections: {note}")
        extra["correction_notes"] = notes
        group_factors = getattr(applied, "group_lr_factors", None)
        lr_factor = group_factors if group_factors is not None else applied.lr_factor
        missing, unknown = list(applied.missing), list(getattr(applied, "unknown", []))
        if (missing or unknown) and progress:
            from rich.console import Console

            Console(stderr=True).print(
                f"corrections: {len(missing)} of {len(named)} parameter tensors are not in the file and keep "
                f"factor 1; {len(unknown)} file group(s) match no parameter"
            )
        extra["corrections"] = {"path": str(Path(corrections).resolve()), "missing": missing, "unknown": unknown}
    optimizer = make_optimizer(config.optimizer, params, config.lr, **config.hparams)
    return fit(
        config, task, optimizer, schedule_owner=optimizer, lr_factor=lr_factor,
        metrics_path=config.metrics, progress=progress, overwrite=overwrite, metadata=extra,
    )
