"""Reading a trace: its metadata, its rows as a DataFrame, and its extent from the Parquet footers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from graftlab.errors import GraftlabError
from graftlab.trace.layout import FORMAT, METADATA_KEY, REQUIRED, PathLike, part_first_step, trace_files


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
    groups = meta.get("groups")
    if groups is not None and not (isinstance(groups, list)
                                   and all(isinstance(g, dict) and isinstance(g.get("name"), str) for g in groups)):
        raise GraftlabError(f"{where}: graftlab metadata 'groups' must be a list of objects with a 'name'")
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
    return _metadata_of(trace_files(Path(path))[0])


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
    """Read a trace as one long DataFrame, one row per recorded (step, group).

    Columns: ``step`` (int64, 0-based optimizer step), ``group`` (str), ``norm_m`` and ``norm_d``
    (float32, Euclidean norms ``||w_M - w_t||`` and ``||w_D - w_t||`` of M's and D's steps on the
    group, in the parameters' units), ``ratio`` (float32, ``norm_m / norm_d``, dimensionless: the
    implicit learning-rate correction of the paper's Algorithm 1 that Section 5 distills; not finite
    where D's step was zero), then the extra per-step columns the trace holds (``lr``, ``loss``, ...).
    A whole trace has (recorded steps) x (groups) rows, sorted by step, then by the metadata's group
    order. The run metadata (see :mod:`graftlab.trace`) is in ``df.attrs["graftlab"]``.

    ``steps=(start, stop)`` keeps ``start <= step < stop`` (either end may be None) and reads only
    the part files and row groups that can hold those steps. ``groups`` (names) and ``columns``
    (extra columns; the required ones always come) narrow the read the same way.

    Raises :class:`~graftlab.errors.GraftlabError` when ``path`` does not exist, holds no part files,
    is not readable Parquet, has no graftlab metadata or a newer format, lacks a required column, or
    lacks a column named in ``columns``. A table another tool wrote (Parquet without graftlab
    metadata, or CSV, with columns ``step, group, ratio``) is read by :func:`graftlab.foreign.read`.
    """
    from graftlab import foreign

    if foreign.is_foreign(path):
        return foreign.read(path, steps=steps, groups=groups, columns=columns)
    path = Path(path)
    files = trace_files(path)
    meta = _metadata_of(files[0])
    start, stop = steps if steps is not None else (None, None)
    if path.is_dir():
        files = _prune(files, start, stop)
    cols = list(dict.fromkeys(list(REQUIRED) + list(columns))) if columns is not None else None
    try:
        schemas = [pq.read_schema(f) for f in files]
        # parts may lack a column (a scalar first logged late) or store it at another width (traces
        # of graftlab 0.1 wrote a scalar logged as a Python float as float64, then as float32 once it
        # was logged as a tensor): read the union of the columns, each at its widest type
        schema = (pa.unify_schemas(schemas, promote_options="permissive") if len(schemas) > 1
                  else (schemas[0] if schemas else None))
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
        cond = ds.field("group").isin(pa.array([str(g) for g in groups], pa.string()))  # typed: [] too
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


def _footer(f: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(f)
    except (pa.ArrowInvalid, OSError) as err:
        raise GraftlabError(f"{f}: not a readable Parquet file ({err})") from None


def _step_bounds(f: Path, md: pq.FileMetaData) -> Optional[tuple[int, int]]:
    """``(min, max)`` of a part's ``step`` column from its row-group statistics (the column itself
    is read only where a writer left them out); None for a part without rows or ``step``."""
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    if "step" not in names or md.num_rows == 0:
        return None
    col = names.index("step")
    lo, hi = [], []
    for rg in range(md.num_row_groups):
        r = md.row_group(rg)
        if r.num_rows == 0:
            continue
        st = r.column(col).statistics
        if st is None or not st.has_min_max:
            steps = pq.read_table(f, columns=["step"]).column("step").to_numpy()
            return (int(steps.min()), int(steps.max())) if steps.size else None
        lo.append(st.min)
        hi.append(st.max)
    return (int(min(lo)), int(max(hi))) if lo else None


def _first_bounds(files: Iterable[Path]) -> Optional[tuple[int, int]]:
    for f in files:
        bounds = _step_bounds(f, _footer(f))
        if bounds is not None:
            return bounds
    return None


def trace_extent(path: PathLike) -> tuple[int, int]:
    """``(first_step, last_step)`` recorded in a trace, from Parquet footers only.

    Only the footers of the first and last parts that hold rows are read, so this costs the same on
    a trace of thousands of parts, and no graftlab metadata is needed. Raises
    :class:`~graftlab.errors.GraftlabError` when ``path`` is not a readable trace, lacks a required
    column, or holds no rows. A foreign table (:mod:`graftlab.foreign`) has its ``step`` column read.
    """
    from graftlab import foreign

    if foreign.is_foreign(path):
        return foreign.extent(path)
    path = Path(path)
    files = trace_files(path)
    names = _footer(files[0]).schema.to_arrow_schema().names
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise GraftlabError(f"{path}: trace lacks required column(s) {', '.join(missing)}")
    first, last = _first_bounds(files), _first_bounds(reversed(files))
    if first is None or last is None:
        raise GraftlabError(f"{path}: the trace is empty (no recorded steps)")
    return first[0], last[1]


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
    files = trace_files(path)
    for f in files:
        md = _footer(f)
        size += f.stat().st_size
        rows += md.num_rows
        for name in md.schema.to_arrow_schema().names:
            if name not in columns:
                columns.append(name)
        b = _step_bounds(f, md)
        if b is not None:
            first = b[0] if first is None else min(first, b[0])
            last = b[1] if last is None else max(last, b[1])
    n_groups = len(meta.get("groups") or []) or 1
    return {"metadata": meta, "parts": len(files), "rows": rows, "first_step": first, "last_step": last,
            "steps": rows // n_groups, "columns": columns, "bytes": size}
