"""The trace contract: one definition of the Parquet trace that ``record`` writes and ``distill`` reads.

A trace is a directory of Parquet part files (or a single Parquet file) that ``pandas.read_parquet``
reads as one long table, one row per recorded (step, group):

=========  ==========================  ==================================================
column     type                        meaning
=========  ==========================  ==================================================
step       int64                       optimizer step (0-based) the row was recorded at
group      string (dictionary-encoded) group name (``named_parameters()`` name, or ``global``)
norm_m     float32                     ``||w_M - w_t||`` on the group
norm_d     float32                     ``||w_D - w_t||`` on the group
ratio      float32                     ``norm_m / norm_d``; not finite where D's step was zero
=========  ==========================  ==================================================

Extra per-step columns are allowed (``lr`` of the magnitude optimizer, ``loss``, ...).

Part files are named ``part-<first step, 12 digits>.parquet`` so that name order is step order, and
each is written under a hidden temporary name and renamed when complete, so a reader never sees a
half-written part. Every part carries the run metadata (a JSON object under the Parquet schema
metadata key ``graftlab``), and the directory holds the same object in ``_graftlab.json``, written
before the first part. Metadata keys (all present; unknown values are null)::

    format        "graftlab.trace/1"
    granularity   "global" | "layer" | "coordinate" | "custom"
    groups        [{"name", "kind", "ffn", "block", "shape", "numel", "members"}, ...]
    magnitude     {"class": "Adam", "hyperparameters": {...}}
    direction     {"class": "SGD", "hyperparameters": {...}}
    task, batch_size, seed, device, every, versions {"graftlab", "torch"}, config {...}
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from graftlab.errors import GraftlabError

FORMAT = "graftlab.trace/1"
METADATA_KEY = b"graftlab"
SIDECAR = "_graftlab.json"
PART_GLOB = "part-*.parquet"
REQUIRED = ("step", "group", "norm_m", "norm_d", "ratio")

SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("group", pa.dictionary(pa.int32(), pa.string())),
        ("norm_m", pa.float32()),
        ("norm_d", pa.float32()),
        ("ratio", pa.float32()),
    ]
)

PathLike = Union[str, os.PathLike]


def part_name(first_step: int) -> str:
    return f"part-{first_step:012d}.parquet"


def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise GraftlabError(f"{path}: no such trace")
    if path.is_file():
        return [path]
    files = sorted(path.glob(PART_GLOB))
    if not files:
        raise GraftlabError(f"{path}: not a trace (no {PART_GLOB} files; an empty or interrupted recording?)")
    return files


def _decode(raw: Optional[bytes], where: Path) -> dict[str, Any]:
    if not raw:
        raise GraftlabError(f"{where}: not a graftlab trace (no graftlab metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise GraftlabError(f"{where}: graftlab metadata is not valid JSON") from None
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("graftlab.trace/"):
        raise GraftlabError(f"{where}: unknown trace format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta["format"] != FORMAT:
        raise GraftlabError(f"{where}: trace format {meta['format']} is newer than this graftlab reads ({FORMAT})")
    return meta


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The run metadata of a trace (from its first part file)."""
    first = _files(Path(path))[0]
    try:
        schema = pq.read_schema(first)
    except (pa.ArrowInvalid, OSError) as err:
        raise GraftlabError(f"{first}: not a readable Parquet file ({err})") from None
    return _decode((schema.metadata or {}).get(METADATA_KEY), first)


def read_trace(
    path: PathLike,
    *,
    steps: Optional[tuple[Optional[int], Optional[int]]] = None,
    groups: Optional[Iterable[str]] = None,
    columns: Optional[Iterable[str]] = None,
) -> pd.DataFrame:
    """Read a trace as a long DataFrame; its metadata is in ``df.attrs["graftlab"]``.

    ``steps=(start, stop)`` keeps ``start <= step < stop`` (either end may be None) and reads only
    the part files and row groups that can hold those steps. ``groups`` and ``columns`` narrow the
    read the same way. Rows come sorted by step, then group order of the metadata.
    """
    path = Path(path)
    meta = read_metadata(path)
    files = _files(path)
    start, stop = steps if steps is not None else (None, None)
    if stop is not None and path.is_dir():
        files = [f for f in files if int(f.stem.split("-")[1]) < stop]
    cols = list(dict.fromkeys(list(REQUIRED) + list(columns))) if columns is not None else None
    try:
        dataset = ds.dataset([str(f) for f in files], format="parquet")
    except (pa.ArrowInvalid, OSError) as err:
        raise GraftlabError(f"{path}: not a readable trace ({err})") from None
    missing = [c for c in REQUIRED if c not in dataset.schema.names]
    if missing:
        raise GraftlabError(f"{path}: trace lacks required column(s) {', '.join(missing)}")
    flt = None
    if start is not None:
        flt = ds.field("step") >= start
    if stop is not None:
        cond = ds.field("step") < stop
        flt = cond if flt is None else flt & cond
    if groups is not None:
        cond = ds.field("group").isin(list(groups))
        flt = cond if flt is None else flt & cond
    table = dataset.to_table(columns=cols, filter=flt)
    df = table.to_pandas()
    df["group"] = df["group"].astype(str)
    order = {g["name"]: i for i, g in enumerate(meta.get("groups") or [])}
    if order:
        df = df.assign(_g=df["group"].map(order)).sort_values(["step", "_g"], kind="stable").drop(columns="_g")
    else:
        df = df.sort_values(["step", "group"], kind="stable")
    df = df.reset_index(drop=True)
    df.attrs["graftlab"] = meta
    return df


def group_table(meta: dict[str, Any]) -> pd.DataFrame:
    """The metadata's groups as a DataFrame indexed by group name (kind, ffn, block, numel, ...)."""
    groups = meta.get("groups") or []
    if not groups:
        return pd.DataFrame(columns=["kind", "ffn", "block", "numel"]).rename_axis("group")
    return pd.DataFrame(groups).set_index("name").rename_axis("group")
