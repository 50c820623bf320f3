"""Runs of the built-in tasks: :func:`record` (M#D, writing a trace) and :func:`train` (one optimizer).

Both read top-down in the same order: validate the config (before anything touches the disk),
set up the environment (:class:`~graftlab.distributed.Runtime`), build the task, the optimizers
(and for ``record`` the :class:`~graftlab.Graft` and its :class:`~graftlab.Recorder`), then run the
loop (:func:`graftlab.runs.fit`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import pandas as pd

from graftlab import trace
from graftlab.distill.analysis import kind_summary
from graftlab.runs.config import RecordConfig, RunConfig, TrainConfig
from graftlab.runs.resume_check import check_resumed_schedule
from graftlab.distributed import is_main
from graftlab.distributed.runtime import Runtime
from graftlab.distill.divergence import RESTART_COLUMN
from graftlab.errors import GraftlabError
from graftlab.graft.optimizer import Graft
from graftlab.graft.optimizers import make_optimizer
from graftlab.record.recorder import Recorder
from graftlab.runs.divergence import Restart
from graftlab.runs.restarts import resumed_restarts
from graftlab.runs.loop import FitResult, fit
from graftlab.tasks import Task, get_task

C = TypeVar("C", bound=RunConfig)


@dataclass
class RecordResult:
    trace: Path  # the trace directory
    fit: FitResult  # the training run
    summary: pd.DataFrame  # graftlab.distill.analysis.kind_summary of the trace (empty on ranks that do not write)
    groups: int  # number of groups recorded


def record(config: RecordConfig, *, overwrite: bool = False, progress: bool = True) -> RecordResult:
    """Train ``config.task`` with M#D for the configured steps, recording every group's ratios.

        >>> res = record(RecordConfig(task="bert", magnitude="adam", direction="sgd", steps=300, out="t"))
        >>> res.summary.loc["Q", "median"]

    ``overwrite`` replaces an existing trace at ``config.out`` (``config.resume`` appends to it).
    With ``config.on_divergence="restart"`` the trace gets a ``restart`` column (restarts before
    each step) and a restart rewinds it to the step the run goes back to.
    Raises :class:`~graftlab.errors.GraftlabError` for any config mistake before anything is
    written (:meth:`RecordConfig.validate`).
    """
    config.validate(overwrite=overwrite)
    rt = Runtime.start(config.device)
    task, config = _task(config, rt)
    check_resumed_schedule(config)  # before the recorder cuts the trace back to the checkpoint's step
    names = rt.wrap_task(task, config.parallel)  # torchrun: DDP or FSDP2 wrapping, this rank's rows
    m_opt = make_optimizer(config.magnitude, task.model.parameters(), config.magnitude_lr, **config.m_hparams)
    d_opt = make_optimizer(config.direction, task.model.parameters(), config.direction_lr, **config.d_hparams)
    graft = Graft(m_opt, d_opt, granularity=config.granularity, names=names, row_block=config.row_block)
    path = Path(config.out).expanduser()
    meta = {"task": config.task, "batch_size": config.batch_size, "seed": config.seed,
            "config": dataclasses.asdict(config), "task_info": task.info()}
    if meta["task_info"].get("autocast") == "bf16":  # float32 weights, gradients computed in bfloat16
        meta["precision"] = "bfloat16"

    def open_recorder(start_step: int, resume: bool) -> Recorder:
        # resuming at step 0 (no checkpoint yet, or a restart from the start) records from scratch:
        # validate() allowed it only over this run's own steps
        fresh = resume and start_step == 0
        return rt.main_only(Recorder, graft, path, every=config.every, flush_every=config.flush_every,
                            metadata=meta, model=names, overwrite=overwrite or fresh, start_step=start_step,
                            resume=resume and not fresh)

    start = rt.resume_step(config)
    continues = path.is_dir() and bool(trace.part_files(path))
    run = _Recording(open_recorder(start, config.resume), open_recorder,
                     marks=config.on_divergence == "restart", restarts=resumed_restarts(config))
    if start and rt.writes:
        _say_resumed(path, start, config.checkpoint_dir, continues)
    try:
        result = fit(config, task, graft, schedule_owner=m_opt, runtime=rt, progress=progress,
                     on_step=lambda step, loss: run.log(loss=rt.mean(loss)), on_restart=run.rewind,
                     overwrite=overwrite, metadata={"trace": str(path)})
    except (KeyboardInterrupt, SystemExit) as stop:
        run.recorder.close()  # the buffered rows first: the line below says what is on disk
        _say_interrupted(stop, path if rt.writes else None, config)
        raise
    finally:
        run.recorder.close()
    summary = kind_summary(trace.read_trace(path)) if rt.writes else pd.DataFrame()
    return RecordResult(path, result, summary, len(graft.group_names))


class _Recording:
    """The recorder of a run that may restart: rows carry the restart count (``marks``), and a
    restart rewinds the trace to the step the run goes back to (the diverged attempt's rows go)."""

    def __init__(self, recorder: Recorder, reopen: Callable[[int, bool], Recorder], marks: bool, restarts: int) -> None:
        self.recorder, self.reopen, self.marks, self.restarts = recorder, reopen, marks, restarts

    def log(self, **scalars: Any) -> None:
        if self.marks:
            scalars[RESTART_COLUMN] = float(self.restarts)
        self.recorder.log(**scalars)

    def rewind(self, restart: Restart) -> None:
        self.recorder.close()
        self.recorder = self.reopen(restart.from_step, True)
        self.restarts = restart.count


def train(
    config: TrainConfig,
    corrections: Optional[str | os.PathLike] = None,
    allow_missing: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    allow_other_optimizer: bool = False,
) -> FitResult:
    """Plain training of a built-in task: the baseline, or with a distilled corrections file.

    Static multipliers in ``corrections`` become per-tensor learning rates (base lr x factor), a
    schedule becomes an lr factor composed with the run's own schedule. Groups absent from the file
    are an error unless ``allow_missing`` (they keep factor 1, and the run says how many).
    ``overwrite`` replaces an existing metrics file. Config mistakes and a bad corrections file
    raise :class:`~graftlab.errors.GraftlabError` before the task is built.

    The factors are relative to D's run, so with ``corrections`` the settings the config leaves
    unset (``optimizer=None``, ``lr=None``, empty ``hparams`` for D's own optimizer) are D's as
    recorded in the file. An ``optimizer`` other than D's is an error unless
    ``allow_other_optimizer``. What the run should know (another base lr, schedules twice) is
    printed to stderr, with or without ``progress``.
    """
    loaded = None
    if corrections is not None:
        from graftlab.corrections import load_corrections

        loaded = load_corrections(corrections)
        config = _for_corrections(config, loaded, corrections, allow_other_optimizer)
    config.validate(overwrite=overwrite, inputs=[("corrections file", corrections)])
    _check_checkpoint_to_resume(config)
    rt = Runtime.start(config.device)
    task, config = _task(config, rt)
    named = list(rt.wrap_task(task, config.parallel).named_parameters())  # torchrun: DDP or FSDP2
    params, lr_factor, extra = [p for _, p in named], None, {}
    if loaded is not None:
        params, lr_factor, extra = _apply_corrections(loaded, corrections, named, config, allow_missing)
    optimizer = make_optimizer(config.optimizer, params, config.lr, **config.hparams)
    if loaded is not None:
        from graftlab.corrections.applying import register_scales

        register_scales(optimizer, rt.resume_step(config))  # per-slice factors: Q/K/V thirds, heads, rows
    try:
        return fit(config, task, optimizer, schedule_owner=optimizer, lr_factor=lr_factor, runtime=rt,
                   metrics_path=config.metrics, progress=progress, overwrite=overwrite, metadata=extra)
    except (KeyboardInterrupt, SystemExit) as stop:
        _say_interrupted(stop, None, config)
        raise


def _check_checkpoint_to_resume(config: TrainConfig) -> None:
    """A plain run with ``resume=True`` continues a checkpoint or nothing: a mistyped or empty
    checkpoint_dir would silently train from scratch (``record`` refuses the same, see
    :func:`graftlab.runs.resume_check.check_resumable`)."""
    from graftlab.distributed.checkpoints import resume_step

    if config.resume and config.checkpoint_dir is not None and resume_step(config) == 0:
        raise GraftlabError(f"{{resume=True}}: {{checkpoint_dir}} {config.checkpoint_dir!r} holds no complete "
                            "checkpoint: check {checkpoint_dir}, or leave out {resume=True} to train from scratch",
                            param=("resume", "checkpoint_dir"))


def _say_resumed(path: Path, start: int, checkpoint_dir: Optional[str], continues: bool) -> None:
    """One stderr line: where a resumed recording's trace starts (a new or empty trace begins at the
    checkpoint's step, not at 0) or continues (``continues``: the trace held steps)."""
    where = f"the checkpoint of step {start} in {checkpoint_dir}"
    if continues:
        _warn(f"resuming trace {path} at step {start} ({where})")
    else:
        _warn(f"trace {path} starts at step {start}: the run resumes from {where}")


def _say_interrupted(stop: BaseException, trace_path: Optional[Path], config: RunConfig) -> None:
    """One stderr line for a run stopped by Ctrl-C or SIGTERM (``fit`` attached what it ran and
    wrote): the step it stopped at, the trace's steps on disk, the metrics file, and where a
    resumed run would continue (the newest checkpoint, which may lie before the step it stopped at)."""
    result: Optional[FitResult] = getattr(stop, "fit_result", None)
    if result is None:
        return  # not an interruption fit handled (an exit asked for, or ranks of a torchrun job)
    steps = result.metrics["step"]
    what = [f"interrupted at step {result.steps}"]
    if trace_path is not None:
        try:
            first, last = trace.trace_extent(trace_path)
            what.append(f"trace {trace_path} holds steps {first}..{last}")
        except GraftlabError:
            what.append(f"trace {trace_path} holds no step yet")
    if result.path is not None:
        span = f"steps {steps.iloc[0]}..{steps.iloc[-1]}" if len(steps) else "no step"
        what.append(f"metrics of {span} written to {result.path}")
    what.append(_resume_hint(config))
    _warn(": ".join(what[:2]) + "".join(f"; {w}" for w in what[2:]))


def _resume_hint(config: RunConfig) -> str:
    """What resuming the interrupted run does: continue from its newest checkpoint, start over, or nothing."""
    from graftlab.distributed.checkpoints import resume_step

    if config.checkpoint_dir is None:
        return "the run cannot be resumed (it has no checkpoint_dir)"
    try:
        at = resume_step(dataclasses.replace(config, resume=True))
    except GraftlabError:
        at = 0
    if at == 0:
        return f"the run cannot be resumed: {config.checkpoint_dir} holds no checkpoint of it yet"
    return f"resuming continues from the checkpoint of step {at} in {config.checkpoint_dir}"


def _task(config: C, rt: Runtime) -> tuple[Task, C]:
    """The config's task on this rank's device, and the config with the task's defaults filled in."""
    task = get_task(config.task, size=config.size, data=config.data, batch_size=config.batch_size,
                    seed=config.seed, device=rt.device, eval_size=config.eval_size)
    return task, config.resolve(task)


def _for_corrections(config: TrainConfig, loaded: Any, source: str | os.PathLike,
                     allow_other: bool) -> TrainConfig:
    """``config`` with what it leaves unset taken from D's recorded run, and D's optimizer enforced."""
    d_opt = loaded.direction_optimizer
    if d_opt is None:
        return config
    if config.optimizer is None:
        meta = loaded.source.get("metadata")
        recorded = meta.get("config") if isinstance(meta, dict) else None
        recorded = recorded if isinstance(recorded, dict) else {}
        changes: dict[str, Any] = {"optimizer": d_opt}
        if config.lr is None and loaded.direction_lr is not None:
            changes["lr"] = loaded.direction_lr
        if not config.hparams and isinstance(recorded.get("d_hparams"), dict):
            changes["hparams"] = dict(recorded["d_hparams"])
        out = dataclasses.replace(config, **changes)
        try:
            out.check_fields()
            out.validate_optimizers()
            return out
        except GraftlabError as err:  # a value the user did not pass: say which key of the file gave it
            said = err.say(lambda param, value: _FILE_KEYS.get(param, param))
            raise GraftlabError(f"{source}: the corrections file's recorded run does not fit this trainer: {said}; "
                                f"pass {{optimizer}} (and {{lr}}, {{hparams}}) to choose D yourself",
                                param=("optimizer", "lr", "hparams")) from None
    if config.optimizer.lower() != d_opt and not allow_other:
        raise GraftlabError(
            f"{source}: the corrections were distilled for D={d_opt}, not {{optimizer={config.optimizer}}}; "
            f"leave {{optimizer}} unset to train {d_opt}, or pass {{allow_other_optimizer=True}}",
            param=("optimizer", "allow_other_optimizer"))
    return config


# where in a corrections file _for_corrections takes each setting it fills in
_FILE_KEYS = {"optimizer": "source.metadata.config.direction", "lr": "source.direction_lr",
              "hparams": "source.metadata.config.d_hparams"}


def _warn(message: str) -> None:
    """A line on stderr from rank 0, whatever the progress setting."""
    if is_main():
        print(message, file=sys.stderr, flush=True)


def _apply_corrections(loaded: Any, source: str | os.PathLike, named: list, config: TrainConfig,
                       allow_missing: bool) -> tuple[list, Any, dict[str, Any]]:
    """``(param groups, lr factor, metrics metadata)`` of a run with corrections file ``loaded``."""
    from graftlab.corrections import apply

    with warnings.catch_warnings():  # the counts are said below, on one line, in the run's words
        warnings.simplefilter("ignore", UserWarning)
        applied = apply(loaded, named, config.lr, allow_missing=allow_missing)
    _check_lr_range(loaded, applied, source)
    notes = _correction_notes(loaded, config)
    missing, unknown = list(applied.missing), list(getattr(applied, "unknown", []))
    for note in notes:
        _warn(f"corrections: {note}")
    if missing or unknown:
        _warn(f"corrections: {len(missing)} of {len(named)} parameter tensors are not in the file and "
              f"keep factor 1; {len(unknown)} file group(s) match no parameter")
    group_factors = getattr(applied, "group_lr_factors", None)
    lr_factor = group_factors if group_factors is not None else applied.lr_factor
    extra = {"correction_notes": notes,
             "corrections": {"path": str(Path(source).resolve()), "missing": missing, "unknown": unknown}}
    return applied.param_groups, lr_factor, extra


def _check_lr_range(corrections: Any, applied: Any, source: str | os.PathLike) -> None:
    """Every corrected learning rate (at the file's largest schedule factor) must be a number the
    parameters' dtype holds: 1e308 x lr is not a correction but an overflow inside the optimizer."""
    import torch

    peak = max([1.0] + [f for pieces in corrections.schedule.values() for _, f in pieces])
    for group in applied.param_groups:
        lr = group["lr"] * peak
        limit = torch.finfo(group["params"][0].dtype).max
        if not math.isfinite(lr) or lr > limit:
            raise GraftlabError(
                f"corrections file {str(source)!r}: {group['name']} gets learning rate {lr:g} (base lr x factor "
                f"{group['factor']:g}{f' x schedule {peak:g}' if peak != 1 else ''}), beyond what "
                f"{str(group['params'][0].dtype).replace('torch.', '')} parameters hold"
            )


def _correction_notes(corrections: Any, config: TrainConfig) -> list[str]:
    """What a user should know before training with ``corrections`` under ``config``."""
    notes = []
    d_opt = corrections.direction_optimizer
    if d_opt is not None and config.optimizer != d_opt:
        notes.append(f"the factors were distilled for D={d_opt}; this run trains {config.optimizer}")
    elif d_opt is None and config.optimizer is not None:
        notes.append(f"the file does not say which optimizer D was; this run trains {config.optimizer} "
                     "(choose it with the optimizer setting: --optimizer on the command line)")
    base = corrections.direction_lr
    if base is not None and not math.isclose(base, config.lr, rel_tol=1e-9):
        notes.append(f"factors are relative to lr {base:g} (D's lr when recorded); this run's base lr is {config.lr:g}")
    if corrections.schedule and (config.schedule != "constant" or config.warmup):
        notes.append(
            "the file holds schedules, which already contain the recorded run's warmup and decay; "
            f"this run also applies its own '{config.schedule}' schedule with warmup {config.warmup or 0:g} "
            "(a constant schedule without warmup follows them alone)"
        )
    return notes
