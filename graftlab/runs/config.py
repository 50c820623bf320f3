"""The run configs as dataclasses, each with its ``validate()`` and ``resolve()``: :class:`RunConfig`
(what every run has), :class:`TrainConfig` (one optimizer), :class:`RecordConfig` (M#D and the trace).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence, TypeVar

from typing import TYPE_CHECKING

from graftlab.distill.divergence import ON_DIVERGENCE
from graftlab.errors import GraftlabError, OutputExistsError
from graftlab.runs.fields import MAX_COUNT, MAX_STEPS, check_value, settings, setting
from graftlab.runs.resume_check import check_resumable
from graftlab.graft.schedules import SCHEDULES, make_schedule
from graftlab.trace import is_trace
from graftlab.trace.outputs import check_output, check_stray_parts

if TYPE_CHECKING:
    from graftlab.tasks import Task

# The choices of the settings, here without importing torch (the command line's help lists them,
# and `graftlab --help` imports no torch); tests/runs/test_train.py checks each against the module
# that defines it (graftlab.tasks, graftlab.graft.optimizers, graftlab.graft.partition, ...).
TASKS = ("bert", "gpt", "resnet")
SIZES = ("tiny", "small", "base")
OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "rmsprop")
MODES = ("none", "ddp", "fsdp")
DEFAULT_FLUSH_EVERY = 100  # graftlab.record.recorder's
MAX_FLUSH = 10**6  # graftlab.record.recorder.MAX_FLUSH_EVERY

DEFAULT_STEPS = 300
GRANULARITIES = ("layer", "global", "coordinate", "head", "vocab")


def max_threads() -> int:
    """The most CPU threads a run may ask for: 16 per core (torch.set_num_threads(100000) crashes
    the process instead of refusing)."""
    return 16 * (os.cpu_count() or 1)


@dataclass
class RunConfig:
    """The fields every run shares; see :class:`TrainConfig` and :class:`RecordConfig`.

    Each field is one setting (:func:`graftlab.runs.fields.setting`): its help, bounds, choices and
    command-line flag are declared here and nowhere else.
    """

    # --- what to train ---
    task: str = setting("bert", "Built-in task: bert (masked LM on the KJV), gpt (causal LM on the KJV) or "
                        "resnet (Fashion-MNIST).", choices=TASKS)
    size: str = setting("tiny", "Model size: tiny (CPU, ~1 min with --threads 1), small, base (BERT-base / "
                        "full-width ResNet-18).", choices=SIZES)
    data: Optional[str] = setting(None, "Your data instead of the bundled set: .txt file/folder (bert, gpt), IDX "
                                  "folder or .npz (resnet).", default_text="the bundled set", path=True)
    # --- how long ---
    steps: Optional[int] = setting(None, "Optimizer steps.", default_text=f"{DEFAULT_STEPS} unless --epochs",
                                   ge=1, le=MAX_STEPS)
    epochs: Optional[float] = setting(None, "Passes over the training set, instead of --steps.",
                                      default_text="none: --steps counts", gt=0, le=MAX_STEPS)
    batch_size: int = setting(32, "Examples per step.", ge=1, le=MAX_COUNT)
    # --- schedule (a factor on the lr per step) ---
    schedule: Optional[str] = setting(None, "The lr schedule.", choices=SCHEDULES,
                                      default_text="the task's: poly for bert and gpt, step for resnet")
    warmup: Optional[float] = setting(None, "Warmup steps (>= 1) or fraction of the run (< 1).",
                                      default_text="the task's", ge=0, le=MAX_STEPS)
    power: float = setting(1.0, "poly decay power, 1 is BERT's linear decay.", gt=0, le=1e6)
    milestones: list = setting(default_factory=lambda: [0.5, 0.75], help="step schedule: comma-separated "
                               "increasing fractions of the run, each in (0, 1).", default_text="0.5,0.75")
    gamma: float = setting(0.1, "step schedule decay factor, in (0, 1].", gt=0, le=1)
    # --- system ---
    device: str = setting("auto", "cpu, cuda, cuda:N or auto (a GPU when there is one).")
    parallel: str = setting("ddp", "Under torchrun: shard parameters with FSDP2 instead of replicating them (DDP).",
                            flag="--fsdp", switch="fsdp", choices=MODES)
    checkpoint_dir: Optional[str] = setting(None, "Save torch.distributed.checkpoint directories here, one per "
                                            "checkpoint: step-N.", default_text="no checkpoints", path=True)
    # 0: only at the end when checkpoint_dir is set; without checkpoint_dir and with
    # on_divergence="restart": steps between in-memory restart points (0: 100)
    checkpoint_every: int = setting(0, "Steps between checkpoints, 0 = only at the end.", ge=0, le=MAX_STEPS)
    resume: bool = setting(False, "Continue from the newest checkpoint in --checkpoint-dir, on any number of "
                           "processes.", switch=True)
    seed: int = setting(0, "Seed for init, data order, masking and dropout.", ge=0, lt=2**63)
    # 1 by default: on a shared, loaded machine PyTorch's threads wait on each other (bert tiny, 2
    # cores at load 15-18: 0.9-1.0 steps/s with 1 thread, 0.1-0.8 with 2)
    threads: Optional[int] = setting(1, "CPU threads for PyTorch; 1 ran up to 9x faster than 2 on a loaded 2-core "
                                     "machine; on an idle machine give its core count.", ge=1, le=4096)
    # --- evaluation and logging ---
    eval_every: int = setting(100, "Evaluate on held-out data every N steps, 0 = only at the end.", ge=0, le=MAX_STEPS)
    eval_size: Optional[int] = setting(None, "Held-out sequences/images per evaluation.", cli=False, ge=1, le=MAX_COUNT)
    log_every: int = setting(50, "Steps between host syncs for the progress bar.", cli=False, ge=1, le=MAX_STEPS)
    metrics: Optional[str] = setting(None, "Parquet file for per-step loss, lr and eval metrics.",
                                     default_text="none written", path=True)
    # --- divergence (every step is checked for a non-finite loss/gradient, without a host sync) ---
    on_divergence: str = setting("stop", "When a loss or gradient stops being finite (checked every step): stop "
                                 "(exit code 3) or restart from the last good state with a smaller lr.",
                                 choices=ON_DIVERGENCE)
    divergence_lr_factor: float = setting(0.5, "Each restart multiplies the learning rate by this, in (0, 1).",
                                          gt=0, lt=1)
    max_restarts: int = setting(3, "Restarts after divergences before the run stops anyway.", ge=0, le=1000)

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
        self.validate_optimizers()
        if outputs:
            self._validate_outputs(overwrite, [("data", self.data), *inputs])

    def check_fields(self) -> None:
        """Every field against its schema (type, bounds, choices; :mod:`graftlab.runs.fields`)."""
        for name in settings(type(self)):
            setattr(self, name, check_value(type(self), name, getattr(self, name)))

    def validate_loop(self) -> None:
        """The checks :func:`graftlab.runs.fit` needs for any task: length, schedule, loop settings."""
        self.check_fields()
        if self.steps is not None and self.epochs is not None:
            raise GraftlabError("give either {steps} or {epochs}, not both", param=("steps", "epochs"))
        if list(self.milestones) != sorted(set(self.milestones)) or not all(0 < m < 1 for m in self.milestones):
            raise GraftlabError(f"{{milestones}} must be increasing fractions in (0, 1), got {self.milestones}",
                                param="milestones")
        if self.epochs is None:  # the length is known before the task: check the schedule against it
            self.check_schedule(self.steps or DEFAULT_STEPS)
        if self.threads is not None and self.threads > max_threads():
            raise GraftlabError(f"{{threads}} must be at most {max_threads()} (16 per CPU core here), got {self.threads}",
                                param="threads")
        if self.checkpoint_dir is None:
            if self.resume:
                raise GraftlabError("{resume=True} needs {checkpoint_dir} (the checkpoints to resume from)",
                                    param=("resume", "checkpoint_dir"))
            if self.checkpoint_every and self.on_divergence != "restart":  # restart: in-memory snapshots
                raise GraftlabError("{checkpoint_every} needs {checkpoint_dir} (where the checkpoints go)",
                                    param=("checkpoint_every", "checkpoint_dir"))

    def check_schedule(self, steps: int) -> None:
        """Build the lr schedule for ``steps`` to check its settings (with the schedule and warmup
        given, or only the warmup while the task's default schedule is not known yet). The poly
        and step settings are checked whichever schedule runs: the task's default is one of them,
        and a nonsense value is a mistake even where unused."""
        for name in dict.fromkeys([self.schedule or "constant", "poly", "step"]):
            make_schedule(name, steps, self.warmup or 0.0, power=self.power, milestones=self.milestones,
                          gamma=self.gamma)

    def _validate_task(self) -> None:
        if self.data is not None and not Path(self.data).expanduser().exists():
            raise GraftlabError(f"{{data}} {self.data!r} does not exist", param="data")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device).strip().lower()):
            raise GraftlabError(f"unknown {{device}} {self.device!r}: choose cpu, cuda, cuda:N or auto", param="device")
        from graftlab.tasks import resolve_device

        resolve_device(self.device)

    def validate_optimizers(self) -> None:
        """Subclasses check their optimizer names, learning rates and hyperparameters."""

    def _validate_outputs(self, overwrite: bool, inputs: list) -> None:
        out = getattr(self, "out", None)  # a trace folder this run creates: nothing else goes in it
        metrics = check_output(self.metrics, "metrics file", overwrite=overwrite, inputs=inputs, new_traces=[out],
                               may_exist=self.resume)
        if metrics is not None and self.resume:  # continued, if it is this run's (graftlab.runs.metrics)
            from graftlab.runs.metrics import resumed_metrics

            resumed_metrics(metrics, dataclasses.asdict(self), overwrite)
        check_output(self.checkpoint_dir, "{checkpoint_dir}", folder=True, inputs=inputs, new_traces=[out])

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

    optimizer: Optional[str] = setting(None, "The optimizer.", choices=OPTIMIZERS,
                                       default_text="D's optimizer of --corrections, else adam")
    lr: Optional[float] = setting(None, "Peak learning rate.", gt=0, default_text="D's recorded lr with "
                                  "--corrections, else the task's default for the optimizer")
    hparams: dict = setting(default_factory=dict, help="Optimizer hyperparameter NAME=VALUE, repeatable (e.g. "
                            "momentum=0.9, betas=0.9,0.98).", flag="--hparam", repeat=True,
                            default_text="the task's for the optimizer", metavar="NAME=VALUE")

    def validate_optimizers(self) -> None:
        _check_optimizer(self.optimizer or "adam", self.lr, self.hparams, "lr", "hparams")

    def resolve(self, task: Task) -> "TrainConfig":
        out = super().resolve(task)
        if out.optimizer is None:
            out = dataclasses.replace(out, optimizer="adam")
        return out if out.lr is not None else dataclasses.replace(out, lr=task.default_lr(out.optimizer))


@dataclass
class RecordConfig(RunConfig):
    """A grafted run M#D that records every group's ratio to a trace (``graftlab record``)."""

    # M gives the step size (the schedule is attached to it), D the direction
    magnitude: str = setting("adam", "M, the step size.", aliases=("-m",), choices=OPTIMIZERS)
    direction: str = setting("sgd", "D, the direction.", aliases=("-d",), choices=OPTIMIZERS)
    magnitude_lr: Optional[float] = setting(None, "M's peak learning rate, the step size.", aliases=("--lr",),
                                            gt=0, default_text="the task's for M")
    direction_lr: Optional[float] = setting(None, "D's learning rate.", gt=0, default_text="the task's for D")
    m_hparams: dict = setting(default_factory=dict, help="M hyperparameter NAME=VALUE, repeatable, e.g. "
                              "betas=0.9,0.98.", flag="--m-hparam", repeat=True, default_text="the task's for M",
                              metavar="NAME=VALUE")
    d_hparams: dict = setting(default_factory=dict, help="D hyperparameter NAME=VALUE, repeatable, e.g. "
                              "momentum=0.9.", flag="--d-hparam", repeat=True, default_text="the task's for D",
                              metavar="NAME=VALUE")
    granularity: str = setting("layer", "Groups: layer (one per tensor), global (one for the model), coordinate "
                               "(one per entry), head (attention per head) or vocab (head, plus embedding and "
                               "output rows).", aliases=("-g",), choices=GRANULARITIES)
    row_block: int = setting(1, "With --granularity vocab: vocabulary rows per group.", ge=1, le=MAX_COUNT)
    out: Optional[str] = setting(None, "Trace directory to write.", aliases=("-o",), path=True,
                                 default_text="required, here or in --config")
    every: int = setting(1, "Record every k-th step.", ge=1, le=MAX_STEPS)
    flush_every: int = setting(DEFAULT_FLUSH_EVERY, "Recorded steps per part file; at most this many are lost "
                               "if the run dies.", ge=1, le=MAX_FLUSH)

    def validate_optimizers(self) -> None:
        _check_optimizer(self.magnitude, self.magnitude_lr, self.m_hparams, "magnitude_lr", "m_hparams")
        _check_optimizer(self.direction, self.direction_lr, self.d_hparams, "direction_lr", "d_hparams")
        if self.row_block != 1 and self.granularity != "vocab":  # said, not ignored
            raise GraftlabError(f"{{row_block}} applies only to {{granularity=vocab}} (vocabulary rows per group), "
                                f"not to {{granularity={self.granularity}}}", param=("row_block", "granularity"))
        if self.steps is not None and self.every > self.steps:
            raise GraftlabError(f"{{every={self.every}}} is more than {{steps={self.steps}}}: the trace would hold "
                                "step 0 only; choose {every} <= {steps}", param=("every", "steps"))

    def _validate_outputs(self, overwrite: bool, inputs: list) -> None:
        super()._validate_outputs(overwrite, inputs)
        if self.out is None:
            raise GraftlabError("{out} is required: the trace directory to write", param="out")
        path = Path(self.out).expanduser()
        check_output(path, "{out}", folder=True, inputs=inputs, may_exist=True, trace=True)
        if not path.is_dir() or not _has_entries(path):
            return
        if not is_trace(path):  # whatever overwrite says: only a trace is ever replaced
            raise GraftlabError(f"{{out}} {str(path)!r} is a folder that does not hold a graftlab trace: choose "
                                "another path (a new or empty folder)", param="out")
        # before the run trains, not when its trace is read at the end; and before pointing to
        # --overwrite, which could not replace the user's file either
        check_stray_parts(path, "{out}")
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
            raise GraftlabError(f"{{every={out.every}}} is more than the run's {out.steps} steps: the trace would "
                                "hold step 0 only; choose a smaller {every}", param="every")
        return out


C = TypeVar("C", bound=RunConfig)

def _check_optimizer(name: str, lr: Optional[float], hparams: dict, lr_field: str, hparams_field: str) -> None:
    for key, value in hparams.items():
        hparams[key] = check_hparam(name, key, value, hparams_field)
    import torch

    from graftlab.graft.optimizers import make_optimizer

    # on one throwaway parameter, the optimizer's own checks of names and ranges run before the task is built
    try:
        make_optimizer(name, [torch.zeros(1, requires_grad=True)], 0.0 if lr is None else lr, **hparams)
    except GraftlabError as err:
        raise GraftlabError(f"{{{hparams_field}}}: {err}", param=hparams_field) from None
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as err:
        raise GraftlabError(f"{{{hparams_field}}}: {name}: {err}", param=hparams_field) from None


def check_hparam(optimizer: str, key: str, value: Any, field_name: str = "hparams") -> Any:
    """A hyperparameter's value checked against the schema its torch.optim default implies (strict:
    ``amsgrad`` takes true or false, not 2; ``betas`` two finite numbers; ``momentum`` a finite
    number); an unknown name is left to the optimizer, which lists the valid ones."""
    from pydantic import ValidationError

    adapter = _hparam_adapter(optimizer, key)
    if adapter is None:
        return value
    try:
        out = adapter.validate_python(list(value) if isinstance(value, tuple) else value)
    except ValidationError as err:
        kind = _HPARAM_KINDS.get(err.errors()[0]["type"], "")
        expect = _hparam_expectation(optimizer, key)
        raise GraftlabError(f"{{{field_name}}}: {optimizer} hyperparameter {key} must be {expect}, got "
                            f"{value!r}{kind}", param=field_name) from None
    return tuple(out) if isinstance(out, list) else out


_HPARAM_KINDS = {"finite_number": " (not finite)"}


def _hparam_default(optimizer: str, key: str) -> Any:
    import inspect

    from graftlab.graft.optimizers import OPTIMIZERS

    cls = OPTIMIZERS.get(str(optimizer).lower())
    param = inspect.signature(cls.__init__).parameters.get(key) if cls is not None else None
    return inspect.Parameter.empty if param is None else param.default


def _hparam_expectation(optimizer: str, key: str) -> str:
    default = _hparam_default(optimizer, key)
    if isinstance(default, bool) or default is None:
        return "true or false"
    if isinstance(default, tuple):
        return f"{len(default)} finite numbers (e.g. {','.join(map(str, default))})"
    return "a finite number"


def _hparam_adapter(optimizer: str, key: str):
    import inspect

    from pydantic import Field, TypeAdapter

    default = _hparam_default(optimizer, key)
    if default is inspect.Parameter.empty:
        return None
    number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
    if isinstance(default, bool) or default is None:  # on/off switches (None: torch picks)
        schema = Optional[bool]
    elif isinstance(default, tuple):
        schema = Annotated[list[number], Field(min_length=len(default), max_length=len(default))]
    elif isinstance(default, (int, float)):
        schema = number
    else:
        return None
    return TypeAdapter(schema, config={"strict": True})


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
        raise GraftlabError("give either {steps} or {epochs}, not both", param=("steps", "epochs"))
    if config.steps is not None:
        steps = int(config.steps)
    elif config.epochs is not None:
        if not config.epochs > 0:
            raise GraftlabError(f"{{epochs}} must be > 0, got {config.epochs}", param="epochs")
        steps = int(round(config.epochs * task.steps_per_epoch))
    else:
        steps = DEFAULT_STEPS
    if steps < 1:
        raise GraftlabError(f"the run needs at least one step, got {steps}")
    return steps


def resolve_config(config: C, task: Task) -> C:
    """``config.resolve(task)``: defaults left as None filled from the task (see :meth:`RunConfig.resolve`)."""
    return config.resolve(task)
