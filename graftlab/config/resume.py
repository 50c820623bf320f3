"""Whether ``graftlab record`` may resume a trace without a checkpoint (:class:`~graftlab.config.RecordConfig`
with ``resume=True``): only when nothing resumable was ever saved and the trace is this run's start."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftlab.errors import GraftlabError

if TYPE_CHECKING:
    from graftlab.config.runs import RecordConfig

# Settings that make a recording another run (a resumed trace must come from the same).
_RUN_IDENTITY = ("task", "size", "data", "seed", "batch_size", "steps", "magnitude", "direction", "magnitude_lr",
                 "direction_lr", "m_hparams", "d_hparams", "granularity", "every", "schedule", "warmup")


def check_resumable(config: "RecordConfig", path: Path, overwrite: bool, *, steps: int) -> None:
    """Refuse to start the recording of ``config`` (``steps`` steps, its defaults filled) over in the
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
    refuse = (f"resume=True: checkpoint_dir {config.checkpoint_dir!r} holds no complete checkpoint, and the trace "
              f"{str(path)!r} holds recorded steps that starting over would drop")
    try:
        recorded = read_metadata(path).get("config") or {}
        last = trace_extent(path)[1]
    except GraftlabError as err:
        raise GraftlabError(f"{refuse} ({err}); pass overwrite=True to record from scratch") from None
    theirs = recorded.get("checkpoint_dir")
    if theirs is None or not _same_path(theirs, config.checkpoint_dir, path):
        how = "without checkpoint_dir" if theirs is None else f"with checkpoint_dir {theirs!r}"
        raise GraftlabError(f"{refuse} (the trace was recorded {how}): check "
                            "checkpoint_dir, or pass overwrite=True to record from scratch")
    # the checkpoint after step due-1 is saved before step due starts: a trace holding step
    # `due` had its checkpoint committed, so one is missing; up to due-1 it may have been cut
    due = min(config.checkpoint_every or steps, steps)
    if last >= due:
        raise GraftlabError(f"{refuse} (steps up to {last}; a checkpoint was due at step {due}): check "
                            "checkpoint_dir, or pass overwrite=True to record from scratch")
    mine = dataclasses.asdict(config)
    for key in _RUN_IDENTITY:
        a, b = recorded.get(key), mine.get(key)
        same = _same_path(a, b, path) if key == "data" else _json(a) == _json(b)
        if a is not None and b is not None and not same:
            raise GraftlabError(f"{refuse}, and they are another run's ({key}={a!r}, this run has {key}={b!r}); "
                                "pass overwrite=True to record from scratch")


def _same_path(recorded: Any, given: Any, trace_dir: Path) -> bool:
    """Whether a path from a trace's metadata names ``given``: the Recorder stores absolute paths
    relative to the trace folder (graftlab.portable); a relative one may also be the cwd's."""
    if not isinstance(recorded, str) or given is None:
        return False
    want = Path(given).expanduser().resolve()
    rec = Path(recorded).expanduser()
    return want in {rec.resolve(), (trace_dir / rec).resolve()}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
