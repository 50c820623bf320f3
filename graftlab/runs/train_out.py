"""What ``train(..., out=DIR)`` (``graftlab train --out DIR``) leaves behind, so a run's results
outlive the terminal: ``result.json`` (the held-out metrics, final train loss, steps, speed, the
run's settings and corrections file), ``model.pt`` (the trained model's ``state_dict``, for
``model.load_state_dict(torch.load(path))``) and ``metrics.parquet`` (one row per step) unless
the run writes its metrics elsewhere.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from graftlab.errors import GraftlabError
from graftlab.io.jsonable import jsonable
from graftlab.io.outputs import write_atomic, write_text
from graftlab.trace.outputs import check_output
from graftlab.version import VERSION

RESULT_FORMAT = "graftlab.train-result/1"
RESULT, MODEL, METRICS = "result.json", "model.pt", "metrics.parquet"


def check_out(out: str | os.PathLike, *, overwrite: bool = False, metrics: Optional[str] = None,
              inputs: Iterable[tuple[str, Any]] = ()) -> Path:
    """Check the folder ``out`` and the files it will hold before a run starts; returns it.

    ``out`` may exist (a folder) and receives only the files above; one that exists already is an
    :class:`~graftlab.errors.OutputExistsError` unless ``overwrite``. Raises
    :class:`~graftlab.errors.GraftlabError` for a file at ``out``, a missing parent folder, or an
    ``out`` that is an input or a trace folder.
    """
    inputs = list(inputs)
    p = check_output(out, "{out} folder", folder=True, inputs=inputs)
    if metrics is not None:  # the metrics file is written during the run: neither out nor one of its files
        m = Path(metrics).expanduser()
        own = {p.resolve() / name for name in (RESULT, MODEL)}
        if m.resolve() == p.resolve() or m.resolve() in own:
            raise GraftlabError(f"{{metrics}} {str(m)!r} is {{out}} {str(p)!r} or one of the files it receives "
                                f"({RESULT}, {MODEL}): choose another metrics path", param=("metrics", "out"))
    if not p.parent.is_dir():
        raise GraftlabError(f"{{out}} {str(p)!r}: its folder {str(p.parent)!r} does not exist", param="out")
    for name in (RESULT, MODEL) + (() if metrics is not None else (METRICS,)):
        check_output(p / name, "output file", overwrite=overwrite, inputs=inputs)
    return p


def metrics_path(out: str | os.PathLike) -> str:
    """Where a run with ``out`` and no metrics path of its own writes its metrics."""
    return str(Path(out) / METRICS)


def write(out: str | os.PathLike, result: Any, config: Any, corrections: Optional[str | os.PathLike] = None) -> list[Path]:
    """Write ``result.json`` and ``model.pt`` of a finished :class:`~graftlab.runs.loop.FitResult`
    into ``out`` (created if missing); returns the files written (the metrics file included when it
    is inside ``out``). Each file is written whole (a temporary name, then a rename)."""
    import torch

    folder = Path(out)
    folder.mkdir(exist_ok=True)
    loss = result.metrics["loss"] if len(result.metrics) and "loss" in result.metrics else None
    record = {
        "format": RESULT_FORMAT,
        "final": {f"heldout_{k}": float(v) for k, v in result.final.items()},
        "final_train_loss": float(loss.iloc[-1]) if loss is not None else None,
        "steps": int(result.steps),
        "diverged_at": result.diverged_at,
        "wall_time_s": float(result.wall_time),
        "steps_per_second": float(result.steps_per_second),
        "optimizer": type(result.optimizer).__name__ if result.optimizer is not None else None,
        "corrections": os.fspath(corrections) if corrections is not None else None,
        "metrics": result.path,
        "model": MODEL,
        "config": jsonable(dataclasses.asdict(config)),
        "versions": {"graftlab": VERSION, "torch": torch.__version__},
    }
    written = []
    if result.model is not None:
        state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
        written.append(write_atomic(folder / MODEL, lambda tmp: torch.save(state, tmp)))
    else:
        record["model"] = None
    written.append(write_text(folder / RESULT, json.dumps(jsonable(record), indent=1) + "\n"))
    if result.path and Path(result.path).parent.resolve() == folder.resolve():
        written.append(Path(result.path))
    return written
