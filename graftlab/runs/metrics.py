"""The metrics file of a run: one Parquet row per step, the run's description in its metadata.

    frame, meta = read_metrics("runs/sgd.parquet")
    frame.columns        # step, loss, lr, eval_loss, eval_accuracy (eval_* NaN where not evaluated)
    meta["config"]       # the resolved config; also "task", "optimizer", "final", "steps_per_second"
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import pandas as pd

from graftlab.errors import GraftlabError, OutputExistsError
from graftlab.io.outputs import write_atomic

METRICS_FORMAT = "graftlab.metrics/1"
METADATA_KEY = b"graftlab.metrics"

# Config fields that make a run another run than the one a metrics file holds; ``steps`` is not
# one of them: a resumed run may run longer (or shorter) than the run it continues.
RUN_IDENTITY = ("task", "size", "data", "seed", "batch_size", "optimizer", "lr", "hparams", "magnitude", "direction",
                "magnitude_lr", "direction_lr", "m_hparams", "d_hparams", "granularity", "every")


_NAMES = ("resume", "metrics", "overwrite")  # the parameters a refused continuation names


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


def resumed_metrics(path: Path, config: Mapping[str, Any], overwrite: bool) -> Optional[pd.DataFrame]:
    """The rows of the metrics file ``path`` that a run resumed with ``config`` (``asdict`` of its
    :class:`~graftlab.runs.RunConfig`) continues, or None: no file, or (``overwrite``) a file of
    another run, which the run then replaces.

    The file must be this run's: the fields of :data:`RUN_IDENTITY` recorded in its metadata
    (``config``) equal ``config``'s where both are set. Raises :class:`GraftlabError` (one line)
    for a file of another run, or one that is not a graftlab metrics file, unless ``overwrite``.
    """
    if not path.exists():
        return None
    try:
        frame, meta = read_metrics(path)
    except GraftlabError as err:
        if overwrite:
            return None
        raise GraftlabError(f"{{resume=True}}: {{metrics}} file {str(path)!r} cannot be continued ({err}); choose "
                            "another metrics file, or pass {overwrite=True} to replace it", param=_NAMES) from None
    recorded = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    kinds = ["a recording (M#D)" if "magnitude" in c else "a plain run" for c in (recorded, config)]
    if recorded and kinds[0] != kinds[1]:
        if overwrite:
            return None
        raise GraftlabError(f"{{resume=True}}: {{metrics}} file {str(path)!r} holds the metrics of {kinds[0]}, not "
                            f"of {kinds[1]}; choose another metrics file, or pass {{overwrite=True}} to replace it",
                            param=_NAMES)
    for key in RUN_IDENTITY:
        a, b = recorded.get(key), config.get(key)
        if a is not None and b is not None and _json(a) != _json(b):
            if overwrite:
                return None
            raise GraftlabError(f"{{resume=True}}: {{metrics}} file {str(path)!r} holds another run "
                                f"({{{key}={a!r}}}, this run has {{{key}={b!r}}}); choose another metrics file, or "
                                "pass {overwrite=True} to replace it", param=(*_NAMES, key))
    return frame


def continued(prior: Optional[pd.DataFrame], first: int, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (the rows of a run resumed at step ``first``) after the rows of ``prior`` before
    ``first``: the metrics of the whole run, one row per step."""
    if prior is None or "step" not in prior.columns:
        return frame
    kept = prior[prior["step"] < first]
    if kept.empty:
        return frame
    return pd.concat([kept, frame], ignore_index=True, sort=False)


def _json(value: Any) -> str:
    # tuples and lists (betas) compare equal once written to JSON, as the metadata holds them
    return json.dumps(value, sort_keys=True, default=str)
