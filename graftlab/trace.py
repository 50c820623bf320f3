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

Extra per-step columns are allowed (``lr`` of the magnitude optimizer, ``loss``, ...). The optional
per-group column ``norm_g`` (float32) is the group's gradient norm, NaN on steps where it was not
taken; :mod:`graftlab.degenerate` reads it to tell float-noise groups apart.

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
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


def _prune(files: list[Path], start: Optional[int], stop: Optional[int]) -> list[Path]:
    """Part files that can hold steps in [start, stop): parts are named by first step, in order."""
    firsts = [part_first_step(f) for f in files]
    keep = []
    for i, f in enumerate(files):
        if stop is not None and firsts[i] >= stop:
            continue
        if start is not None and i + 1 < len(files) and firsts[i + 1] <= start:
            continue  # every step of this part is below the next part's first step
        keep.append(f)
    return keep or files[:1]  # an empty range still reads one footer for the schema


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The run metadata of a trace (from its first part file; inferred for a table another tool
    wrote, see :mod:`graftlab.foreign`)."""
    from graftlab import foreign

    if foreign.is_foreign(path):
        return foreign.metadata(path)
    return _metadata_of(_files(Path(path))[0])


def _metadata_of(first: Path) -> dict[str, Any]:
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
    read the same way. Rows come sorted by step, then group order of the metadata. A table another
    tool wrote (Parquet without graftlab metadata, or CSV) is read by :func:`graftlab.foreign.read`.
    """
    from graftlab import foreign

    if foreign.is_foreign(path):
        return foreign.read(path, steps=steps, groups=groups, columns=columns)
    path = Path(path)
    files = _files(path)
    meta = _metadata_of(files[0])
    start, stop = steps if steps is not None else (None, None)
    if path.is_dir():
        files = _prune(files, start, stop)
    cols = list(dict.fromkeys(list(REQUIRED) + list(columns))) if columns is not None else None
    try:
        # parts may differ in their extra columns (a scalar first logged late): read their union
        schemas = [pq.read_schema(f) for f in files]
        schema = pa.unify_schemas(schemas) if len(schemas) > 1 else (schemas[0] if schemas else None)
        dataset = ds.dataset([str(f) for f in files], format="parquet", schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as err:
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
    unknown = [c for c in (cols or []) if c not in dataset.schema.names]
    if unknown:
        raise GraftlabError(f"{path}: trace has no column(s) {', '.join(unknown)}")
    try:
        table = dataset.to_table(columns=cols, filter=flt)
    except (pa.ArrowInvalid, OSError) as err:
        raise GraftlabError(f"{path}: not a readable trace ({err})") from None
    table = _in_step_and_group_order(table, [g["name"] for g in meta.get("groups") or []])
    df = table.to_pandas()
    df["group"] = df["group"].astype(str)
    df = df.reset_index(drop=True)
    df.attrs["graftlab"] = meta
    return df


def _in_step_and_group_order(table: pa.Table, names: list[str]) -> pa.Table:
    """Rows sorted by step, then by the metadata's group order (names not in it go last).

    The ranking runs in Arrow (one hash lookup per row); a recorded trace is already in this order,
    so usually nothing is moved.
    """
    group = table.column("group")
    if pa.types.is_dictionary(group.type):
        group = group.cast(pa.string())
    rank = pc.index_in(group, value_set=pa.array(names, pa.string())).fill_null(len(names)).to_numpy()
    step = table.column("step").to_numpy()
    ds_, dg = np.diff(step), np.diff(rank)
    if ((ds_ > 0) | ((ds_ == 0) & (dg >= 0))).all():
        return table
    return table.take(pa.array(np.lexsort((rank, step))))


def group_table(meta: dict[str, Any]) -> pd.DataFrame:
    """The metadata's groups as a DataFrame indexed by group name (kind, ffn, block, numel, ...)."""
    groups = meta.get("groups") or []
    if not groups:
        return pd.DataFrame(columns=["kind", "ffn", "block", "numel"]).rename_axis("group")
    return pd.DataFrame(groups).set_index("name").rename_axis("group")


# -- writing ----------------------------------------------------------------------------------
# Per-row cost matters (one row per step and group): floats are byte-stream-split before zstd (their
# exponent bytes then compress well), step and group repeat in runs and go through dictionary + RLE.
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3
FLOAT_ENCODING = "BYTE_STREAM_SPLIT"


def metadata_bytes(meta: dict[str, Any]) -> bytes:
    """The metadata as stored under :data:`METADATA_KEY` (and in the sidecar)."""
    return json.dumps(meta, default=str).encode()


def build_table(
    steps: "Any",
    group_names: Iterable[str],
    stats: "Any",
    scalars: Optional[dict[str, "Any"]] = None,
    meta: Optional[dict[str, Any]] = None,
    group_columns: Optional[dict[str, "Any"]] = None,
) -> pa.Table:
    """A trace table from ``steps`` (n,), ``stats`` (n, 3, G) ``[norm_m, norm_d, ratio]`` per step and
    group, per-step ``scalars`` (name -> (n,) floats, repeated on every group row of the step) and
    optional per-group float32 columns ``group_columns`` (name -> (n, G), e.g. ``norm_g``)."""
    import numpy as np

    names = list(group_names)
    steps = np.asarray(steps, dtype=np.int64)
    stats = np.asarray(stats, dtype=np.float32)
    n, g = len(steps), len(names)
    if stats.shape != (n, 3, g):
        raise ValueError(f"stats must have shape ({n}, 3, {g}), got {stats.shape}")
    indices = pa.array(np.tile(np.arange(g, dtype=np.int32), n))
    columns = {
        "step": pa.array(np.repeat(steps, g)),
        "group": pa.DictionaryArray.from_arrays(indices, pa.array(names, type=pa.string())),
        "norm_m": pa.array(stats[:, 0, :].reshape(-1)),
        "norm_d": pa.array(stats[:, 1, :].reshape(-1)),
        "ratio": pa.array(stats[:, 2, :].reshape(-1)),
    }
    fields = list(SCHEMA)
    for key, values in (group_columns or {}).items():
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (n, g):
            raise ValueError(f"group column {key!r} must have shape ({n}, {g}), got {values.shape}")
        columns[key] = pa.array(values.reshape(-1))
        fields.append(pa.field(key, pa.float32()))
    for key, values in (scalars or {}).items():
        if key in columns:
            raise ValueError(f"scalar column {key!r} clashes with a trace column")
        values = np.asarray(values)
        kind = pa.float64() if values.dtype == np.float64 else pa.float32()
        columns[key] = pa.array(np.repeat(values.astype(kind.to_pandas_dtype()), g))
        fields.append(pa.field(key, kind))
    schema = pa.schema(fields, metadata={METADATA_KEY: metadata_bytes(meta)} if meta is not None else None)
    return pa.table(list(columns.values()), schema=schema)


def write_table(table: pa.Table, path: PathLike) -> None:
    """Write ``table`` to ``path`` atomically: under a hidden name first, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    floats = [f.name for f in table.schema if f.name in ("norm_m", "norm_d", "ratio", "norm_g")]
    others = [f.name for f in table.schema if f.name not in floats]
    meta = (table.schema.metadata or {}).get(METADATA_KEY)
    # store_schema=False: the Arrow schema copy would hold the metadata JSON a second time in every
    # footer. Readers then see ``group`` as plain strings, which read_trace returns anyway.
    with pq.ParquetWriter(
        tmp,
        table.schema,
        compression=COMPRESSION,
        compression_level=COMPRESSION_LEVEL,
        use_dictionary=others,
        column_encoding={c: FLOAT_ENCODING for c in floats},
        write_statistics=True,
        store_schema=False,
    ) as writer:
        writer.write_table(table)
        if meta is not None:
            writer.add_key_value_metadata({METADATA_KEY: meta})
    os.replace(tmp, path)


def write_part(directory: PathLike, table: pa.Table) -> Path:
    """Write one part file of a trace directory; its name comes from its first step."""
    first = int(table.column("step")[0].as_py())
    path = Path(directory) / part_name(first)
    write_table(table, path)
    return path


def write_sidecar(directory: PathLike, meta: dict[str, Any]) -> Path:
    """Write ``_graftlab.json`` (atomically) into a trace directory."""
    path = Path(directory) / SIDECAR
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, path)
    return path


def part_first_step(path: PathLike) -> int:
    """The first step of a part file, from its name."""
    return int(Path(path).stem.split("-")[1])


def trace_info(path: PathLike) -> dict[str, Any]:
    """What a trace holds, from the Parquet footers only (no data pages are read).

    Returns ``{"metadata", "parts", "rows", "first_step", "last_step", "steps", "columns", "bytes"}``;
    ``steps`` counts distinct recorded steps (rows / groups).
    """
    from graftlab import foreign

    if foreign.is_foreign(path):
        return foreign.info(path)
    path = Path(path)
    meta = read_metadata(path)
    rows, first, last, size = 0, None, None, 0
    columns: list[str] = []
    files = _files(path)
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as err:
            raise GraftlabError(f"{f}: not a readable Parquet file ({err})") from None
        md = pf.metadata
        size += f.stat().st_size
        rows += md.num_rows
        for name in pf.schema_arrow.names:
            if name not in columns:
                columns.append(name)
        idx = pf.schema_arrow.get_field_index("step")
        for rg in range(md.num_row_groups):
            st = md.row_group(rg).column(idx).statistics
            if st is None or not st.has_min_max or md.row_group(rg).num_rows == 0:
                continue
            first = st.min if first is None else min(first, st.min)
            last = st.max if last is None else max(last, st.max)
    n_groups = len(meta.get("groups") or []) or 1
    return {"metadata": meta, "parts": len(files), "rows": rows, "first_step": first, "last_step": last,
            "steps": rows // n_groups, "columns": columns, "bytes": size}
