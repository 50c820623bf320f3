"""The metrics file of a run: one Parquet row per step, the run's description in its metadata.

    frame, meta = read_metrics("runs/sgd.parquet")
    frame.columns        # step, loss, lr, eval_loss, eval_accuracy (eval_* NaN where not evaluated)
    meta["config"]       # the resolved config; also "task", "optimizer", "final", "steps_per_second"
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from graftlab.errors import GraftlabError, OutputExistsError
from graftlab.outputs import write_atomic

METRICS_FORMAT = "graftlab.metrics/1"
METADATA_KEY = b"graftlab.metrics"


def write_metrics(path: Path, frame: pd.DataFrame, metadata: dict[str, Any], overwrite: bool = False) -> None:
    """Write ``frame`` to Parquet with ``metadata`` (JSON) under key ``graftlab.metrics``; atomic.

    An existing ``path`` is an :class:`~graftlab.errors.OutputExistsError` unless ``overwrite``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists() and not overwrite:
        raise OutputExistsError(path, "metrics file")
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(metadata, default=str).encode()
    table = table.replace_schema_metadata(meta)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp), overwrite=overwrite, what="metrics file")


def read_metrics(path: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A metrics file written by :func:`graftlab.runs.fit`: ``(DataFrame, metadata)``."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:
        raise GraftlabError(f"cannot read metrics file {str(path)!r}: {err}") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise GraftlabError(f"{str(path)!r} is not a graftlab metrics file")
    return table.to_pandas(), json.loads(raw)
