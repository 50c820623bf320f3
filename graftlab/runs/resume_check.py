"""Whether ``graftlab record`` may resume a trace without a checkpoint (:class:`~graftlab.runs.RecordConfig`
with ``resume=True``): only when nothing resumable was ever saved and the trace is this run's start."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from graftlab.errors import GraftlabError

# Settings that make a recording another run (a resumed trace must come from the same).
_RUN_IDENTITY = ("task", "size", "data", "seed", "batch_size", "steps", "magnitude", "direction", "magnitude_lr",
                 "direction_lr", "m_hparams", "d_hparams", "granularity", "every", "schedule", "warmup")


_RESUME = ("resume", "checkpoint_dir", "overwrite")  # the parameters a refused resume names


def check_resumable(config: Any, path: Path, overwrite: bool, *, steps: int) -> None:
    """Refuse to start the recording of ``config`` (a RecordConfig; ``steps`` steps, its defaults filled) over in the
    trace ``path`` unless the trace holds the start of this same run, checkpointing into this
    checkpoint_dir and cut before its first checkpoint was due: nothing resumable was ever saved.
    Anything else (a mistyped checkpoint_dir, a run recorded without checkpoints, another run's
    trace, a run past its first checkpoint) would drop steps for good.

    Raises:
        GraftlabError: naming the reason and ``overwrite=True`` as the way to record from scratch.
    """
    from graftlab.distributed.checkpoints import resume_step
    from graftlab.trace import part_files, read_metadata, trace_extent

    if overwrite or resume_step(config) > 0 or not part_files(path):
        return
    refuse = (f"{{resume=True}}: {{checkpoint_dir}} {config.checkpoint_dir!r} holds no complete checkpoint, and the trace "
              f"{str(path)!r} holds recorded steps that starting over would drop")
    try:
        recorded = read_metadata(path).get("config") or {}
        last = trace_extent(path)[1]
    except GraftlabError as err:
        raise GraftlabError(f"{refuse} ({err}); pass {{overwrite=True}} to record from scratch", param=_RESUME) from None
    theirs = recorded.get("checkpoint_dir")
    if theirs is None or not _same_path(theirs, config.checkpoint_dir, path):
        how = "without {checkpoint_dir}" if theirs is None else f"with {{checkpoint_dir}} {theirs!r}"
        raise GraftlabError(f"{refuse} (the trace was recorded {how}): check "
                            "{checkpoint_dir}, or pass {overwrite=True} to record from scratch", param=_RESUME)
    # the checkpoint after step due-1 is saved before step due starts: a trace holding step
    # `due` had its checkpoint committed, so one is missing; up to due-1 it may have been cut
    due = min(config.checkpoint_every or steps, steps)
    if last >= due:
        raise GraftlabError(f"{refuse} (steps up to {last}; a checkpoint was due at step {due}): check "
                            "{checkpoint_dir}, or pass {overwrite=True} to record from scratch", param=_RESUME)
    mine = dataclasses.asdict(config)
    for key in _RUN_IDENTITY:
        a, b = recorded.get(key), mine.get(key)
        same = _same_path(a, b, path) if key == "data" else _json(a) == _json(b)
        if a is not None and b is not None and not same:
            raise GraftlabError(f"{refuse}, and they are another run's ({{{key}={a!r}}}, this run has {{{key}={b!r}}}); "
                                "pass {overwrite=True} to record from scratch", param=(*_RESUME, key))


def _same_path(recorded: Any, given: Any, trace_dir: Path) -> bool:
    """Whether a path from a trace's metadata names ``given``: the Recorder stores absolute paths
    relative to the trace folder (graftlab.trace.portable); a relative one may also be the cwd's."""
    if not isinstance(recorded, str) or given is None:
        return False
    want = Path(given).expanduser().resolve()
    rec = Path(recorded).expanduser()
    return want in {rec.resolve(), (trace_dir / rec).resolve()}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# Settings that fix the learning rate of every step (graftlab.graft.schedules.make_schedule); a checkpoint
# keeps them so that a resumed run can tell whether it would give the steps already run other rates.
SCHEDULE_SETTINGS = ("steps", "schedule", "warmup", "power", "milestones", "gamma")


def schedule_settings(config: Any) -> dict[str, Any]:
    """The lr schedule settings of a resolved run config (what a checkpoint stores under ``lr_schedule``)."""
    return {key: _plain(getattr(config, key, None)) for key in SCHEDULE_SETTINGS}


def check_resumed_schedule(config: Any) -> Optional[str]:
    """Refuse to resume ``config`` (resolved: ``steps`` and ``schedule`` filled) from a checkpoint
    saved under other lr schedule settings when they give the steps already run other learning
    rates: the schedule is a function of the run's length (``steps``), so a longer run would have
    decayed more slowly, and the trace/metrics would hold two schedules glued together.

    Returns a note when the settings differ but the rates of the steps already run do not (a
    constant schedule without warmup extends a run), None otherwise; checkpoints saved before
    the settings were stored are not checked.

    Raises:
        GraftlabError: naming the checkpoint's and this run's settings (``steps=80`` / ``steps=100``).
    """
    from graftlab.distributed.checkpoints import CHECKPOINT_META, Checkpoints, checkpoint_step
    from graftlab.graft.schedules import make_schedule

    directory = getattr(config, "checkpoint_dir", None)
    if directory is None or not getattr(config, "resume", False):
        return None
    latest = Checkpoints(directory, None, None).latest()
    if latest is None:
        return None
    try:
        extra = json.loads((latest / CHECKPOINT_META).read_text()).get("extra") or {}
    except (OSError, ValueError, AttributeError) as err:
        raise GraftlabError(f"unreadable checkpoint metadata {latest / CHECKPOINT_META}: {err}") from None
    theirs, mine = extra.get("lr_schedule"), schedule_settings(config)
    if not isinstance(theirs, dict) or _json(theirs) == _json(mine):
        return None
    done = int(extra.get("step", checkpoint_step(latest)))
    changed = [k for k in SCHEDULE_SETTINGS if _json(theirs.get(k)) != _json(mine[k])]
    was = ", ".join(f"{{{k}={theirs.get(k)!r}}}" for k in changed)  # the settings, as placeholders
    now = ", ".join(f"{{{k}={mine[k]!r}}}" for k in changed)

    def rates(s: dict[str, Any]) -> list[float]:
        f = make_schedule(s["schedule"], s["steps"], s["warmup"] or 0.0, power=s["power"],
                          milestones=s["milestones"], gamma=s["gamma"])
        return [float(f(i)) for i in range(done + 1)]  # the rate of each step run, and of the next

    try:
        same = rates({**mine, **theirs}) == rates(mine)
    except (GraftlabError, TypeError, KeyError):
        same = False
    where = f"the checkpoint of step {done} in {directory}"
    if not same:
        raise GraftlabError(
            f"{{resume=True}}: {where} was saved by a run with {was}; this run has {now}, which gives the {done} "
            f"steps already run other learning rates ({mine['schedule']!r} schedule): resume with {was}, or start "
            "a new run with another {checkpoint_dir}", param=(*_RESUME, *changed))
    return GraftlabError(f"resuming {where} (saved with {was}) with {now}: the {mine['schedule']!r} schedule gives "
                         "the steps already run the same learning rates", param=changed).say()


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
