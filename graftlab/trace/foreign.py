"""Traces written by other tools: a table of ``step, group`` and ``ratio``, or of ``step, group,
norm_m, norm_d`` (what a ``graftlab.trace/2`` part stores) from which ``ratio = norm_m / norm_d`` is
computed as :func:`graftlab.read_trace` computes it (in float32 when both norms are float32).

The trace contract (:mod:`graftlab.trace`) says a table with these columns and no graftlab metadata
is still a trace. Accepted here:

- a Parquet file, or a directory of Parquet files with any names (pandas, pyarrow, polars, DuckDB,
  Spark; hive partitions such as ``group=.../`` included), whose schema holds no graftlab metadata:
  e.g. ``pd.read_parquet("runs/t").to_parquet("x.parquet")``;
- ``graftlab.trace/2`` part files away from their trace's ``_graftlab.json`` (one copied out of the
  directory, a slice of one written with pyarrow, which keeps the part's marker, or a directory of
  copied parts): the run metadata is not found, and is inferred as for any table;
- a CSV file (``.csv``, one header row) with those columns; ``inf``/``nan``/empty cells are
  non-finite values.

``group`` may be plain or dictionary-encoded strings (any other type is turned into text), ``step``
integers (integral floats are accepted), the float columns any numeric type. What the metadata
would say is inferred: each group's kind, feed-forward position and transformer block from its name
(:func:`graftlab.kinds.classify_names`), and ``global`` granularity for a single group named
``global``. What cannot be inferred (the optimizers and D's learning rate, which the factors are
relative to; batch size; seed; the granularity otherwise) stays null and :func:`note` says so in
one line, which ``info``, ``distill`` and ``plot`` print.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from graftlab.errors import GraftlabError
from graftlab.trace.layout import FORMAT, METADATA_KEY, SIDECAR

PathLike = Union[str, os.PathLike]

COLUMNS = ("step", "group", "ratio")
OPTIONAL = ("norm_m", "norm_d")  # with both, ``ratio`` may be left out: it is computed from them
CSV_SUFFIX = ".csv"
_FLOATS = ("ratio", "norm_m", "norm_d", "norm_g")


# --------------------------------------------------------------------------- recognising

def _has_graftlab_metadata(file: Path) -> bool:
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowInvalid, OSError):
        return True  # not readable Parquet: leave the error to the graftlab reader
    return METADATA_KEY in (schema.metadata or {})


def _orphan_part(file: Path) -> bool:
    """Whether ``file`` is a ``graftlab.trace/2`` part (its footer holds only the marker pointing to
    the sidecar) with no ``_graftlab.json`` beside it: its run metadata is not to be found."""
    from graftlab.trace.parts import is_marker

    if (file.parent / SIDECAR).exists():
        return False
    try:
        raw = (pq.read_schema(file).metadata or {}).get(METADATA_KEY)
        meta = json.loads(raw) if raw else None
    except (pa.ArrowInvalid, OSError, ValueError):
        return False  # not readable Parquet, or damaged metadata: the graftlab reader says so
    return isinstance(meta, dict) and is_marker(meta)


def _parquet_files(directory: Path) -> list[Path]:
    """Data files under ``directory`` as pyarrow's dataset discovery sees them (hidden ones skipped)."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        out.extend(Path(root) / f for f in sorted(files)
                   if not f.startswith((".", "_")) and f.endswith((".parquet", ".pq", ".parq")))
    return out


def is_foreign(path: PathLike) -> bool:
    """True when ``path`` is a table another tool wrote (CSV, or Parquet without graftlab metadata).

    A graftlab trace directory has ``_graftlab.json`` or part files carrying the metadata; anything
    else (a missing path included) is for :mod:`graftlab.trace` to read or reject. A ``/2`` part
    file without the sidecar beside it is foreign too: its metadata is nowhere to read.
    """
    p = Path(path)
    if p.is_file():
        if p.name.lower().endswith(CSV_SUFFIX):
            return True
        return not _has_graftlab_metadata(p) or _orphan_part(p)
    if p.is_dir():
        if (p / SIDECAR).exists():
            return False
        files = _parquet_files(p)
        # part files copied without their trace's sidecar: read as the single copied part is
        return bool(files) and (not _has_graftlab_metadata(files[0]) or _orphan_part(files[0]))
    return False


# --------------------------------------------------------------------------- opening

@functools.lru_cache(maxsize=2)
def _csv_table(path: str, mtime_ns: int, size: int) -> pa.Table:
    """The parsed CSV (kept for the next call on the same unchanged file: distill opens it 3 times)."""
    import pyarrow.csv as pcsv

    types = {"step": pa.int64(), "group": pa.string(), **{c: pa.float64() for c in _FLOATS}}
    try:
        names = pcsv.open_csv(path).schema.names
        opts = pcsv.ConvertOptions(column_types={k: v for k, v in types.items() if k in names},
                                   strings_can_be_null=False)
        return pcsv.read_csv(path, convert_options=opts)
    except (pa.ArrowInvalid, OSError) as err:
        raise GraftlabError(f"{path}: not a readable CSV trace ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _dataset(path: Path) -> tuple[ds.Dataset, str]:
    """The table behind ``path`` as a pyarrow dataset, and its format (``parquet`` or ``csv``)."""
    if path.is_file() and path.name.lower().endswith(CSV_SUFFIX):
        st = path.stat()
        return ds.dataset(_csv_table(str(path), st.st_mtime_ns, st.st_size)), "csv"
    try:
        return ds.dataset(str(path), format="parquet", partitioning="hive"), "parquet"
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as err:
        raise GraftlabError(f"{path}: not a readable Parquet table ({_first_line(err)})") from None


def _computes_ratio(names: Iterable[str]) -> bool:
    """A table without ``ratio`` but with both norms: ``ratio`` is computed from them."""
    names = list(names)
    return "ratio" not in names and all(c in names for c in OPTIONAL)


def _check_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in COLUMNS if c not in names and not (c == "ratio" and _computes_ratio(names))]
    if missing:
        raise GraftlabError(
            f"{path}: not a trace: no graftlab metadata, and a table needs columns step, group, ratio "
            f"(or norm_m and norm_d, to compute ratio from); missing {', '.join(missing)} "
            f"(columns: {', '.join(names) or 'none'})"
        )


def _ratio(path: Path, table: pa.Table) -> pa.ChunkedArray:
    """``norm_m / norm_d`` as :func:`graftlab.read_trace` computes it for a ``/2`` trace: float32 when
    both norms are float32 (bit-identical to the Graft's), else float64; not finite where D's is 0."""
    m, d = table.column("norm_m"), table.column("norm_d")
    if not (pa.types.is_float32(m.type) and pa.types.is_float32(d.type)):
        try:
            m, d = m.cast(pa.float64()), d.cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise GraftlabError(f"{path}: columns norm_m and norm_d must hold numbers, not "
                                f"{m.type} and {d.type}") from None
    return pc.divide(m, d)


def _as_text(col: Union[pa.Array, pa.ChunkedArray]) -> pa.ChunkedArray:
    col = col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col])
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not pa.types.is_string(col.type):
        col = col.cast(pa.string())
    return col


def _steps(path: Path, col: pa.ChunkedArray) -> pa.ChunkedArray:
    """The ``step`` column as int64; GraftlabError for empty, fractional or negative steps (a
    trace's steps count optimizer steps from 0)."""
    if col.null_count:
        raise GraftlabError(f"{path}: column step has {col.null_count} empty value(s)")
    if pa.types.is_integer(col.type):
        try:
            col = col.cast(pa.int64())  # checked: a uint64 step past 2**63 - 1 is no step number
        except (pa.ArrowInvalid, OverflowError):
            raise GraftlabError(f"{path}: column step holds values beyond the largest step number (2**63 - 1)") from None
    elif pa.types.is_floating(col.type):
        vals = col.to_numpy()
        if not (np.isfinite(vals).all() and (vals == np.round(vals)).all()):
            raise GraftlabError(f"{path}: column step must hold whole step numbers")
        col = pa.chunked_array([pa.array(vals.astype(np.int64))])
    else:
        raise GraftlabError(f"{path}: column step must hold integers, not {col.type}")
    if len(col) and pc.min(col).as_py() < 0:
        vals = col.to_numpy()
        first = int(vals[np.flatnonzero(vals < 0)[0]])
        raise GraftlabError(f"{path}: step {first} is negative (steps count optimizer steps from 0); "
                            f"{int((vals < 0).sum())} row(s) have a negative step")
    return col


def _check_unique(path: Path, step: np.ndarray, rank: np.ndarray, group: np.ndarray) -> None:
    """GraftlabError naming the first (step, group) pair that two rows hold (``step``, ``rank``
    and ``group`` in sorted row order): its ratio would be ambiguous."""
    if len(step) < 2:
        return
    dup = np.flatnonzero((step[1:] == step[:-1]) & (rank[1:] == rank[:-1]))
    if len(dup):
        i = int(dup[0])
        raise GraftlabError(f"{path}: step {int(step[i])} of group {str(group[i])!r} appears in more than one row "
                            f"({len(dup)} repeated (step, group) row(s)); keep one row per step and group")


def _group_names(dataset: ds.Dataset) -> list[str]:
    """Group names in order of first appearance (reads only the ``group`` column)."""
    col = _as_text(dataset.to_table(columns=["group"]).column("group"))
    if col.null_count:
        raise GraftlabError("column group has empty values")
    names = [str(g) for g in pc.unique(col).to_pylist()]
    if "" in names:
        raise GraftlabError("column group holds an empty name (a group needs a name)")
    return names


# --------------------------------------------------------------------------- metadata

def infer_metadata(names: Iterable[str], *, source: str, columns: Iterable[str],
                   orphan: bool = False) -> dict[str, Any]:
    """Run metadata for a table without any: kinds and blocks from the group ``names``; the rest null.

    Keys as in :mod:`graftlab.trace` (``format`` is None), plus ``foreign``:
    ``{"format": source, "inferred": [...], "unknown": [...], "computed": [...], "orphan": bool}``;
    ``computed`` lists ``"ratio"`` when the table has the norms and no ratio; ``orphan``: the table
    is a ``graftlab.trace/2`` part (or a directory of them) away from its ``_graftlab.json``.
    """
    from graftlab.kinds import classify_names, to_dict

    names = list(names)
    columns = list(columns)
    kinds = classify_names(names)
    granularity = "global" if names == ["global"] else None
    unknown = ["D's learning rate (factors are relative to it)", "the optimizers", "batch size", "seed"]
    if granularity is None:
        unknown.append("granularity")
    missing = [c for c in OPTIONAL + ("norm_g",) if c not in columns]
    if missing:
        unknown.append(", ".join(missing) + " (not in the table)")
    return {
        "format": None,
        "foreign": {"format": source, "inferred": ["kind", "ffn", "block"], "unknown": unknown,
                    "computed": ["ratio"] if _computes_ratio(columns) else [], "orphan": bool(orphan)},
        "granularity": granularity,
        "groups": [{"name": n, **to_dict(kinds[n]), "shape": None, "numel": None, "members": None} for n in names],
        "magnitude": None, "direction": None, "task": None, "batch_size": None, "seed": None,
        "device": None, "every": None, "versions": None, "config": None,
    }


def source(meta: dict[str, Any]) -> Optional[str]:
    """What a foreign trace is, in the words ``info`` (its format row) and :func:`note` both use:
    ``"graftlab.trace/2 part file(s) without the _graftlab.json of their trace"`` or ``"parquet table
    (no graftlab metadata)"``; None for a graftlab trace's metadata."""
    info = meta.get("foreign") if isinstance(meta, dict) else None
    if not isinstance(info, dict):
        return None
    if info.get("orphan"):
        return f"{FORMAT} part file(s) without the {SIDECAR} of their trace"
    return f"{info.get('format')} table (no graftlab metadata)"


def note(meta: dict[str, Any]) -> Optional[str]:
    """One line saying what a foreign trace's metadata inferred and what is unknown; None otherwise."""
    what = source(meta)
    if what is None:
        return None
    info = meta["foreign"]
    what = (f"run metadata not found ({what}; copying the trace's {SIDECAR} beside the part files restores it)"
            if info.get("orphan") else f"no graftlab metadata ({info.get('format')} table)")
    computed = "; ratio computed as norm_m / norm_d" if "ratio" in (info.get("computed") or []) else ""
    return (f"{what}: kinds and transformer blocks inferred from the group names; unknown: "
            f"{', '.join(info.get('unknown') or [])}{computed}")


def metadata(path: PathLike) -> dict[str, Any]:
    """The inferred metadata of the foreign trace at ``path`` (reads only its ``group`` column)."""
    path = Path(path)
    dataset, fmt = _dataset(path)
    _check_columns(path, dataset.schema.names)
    try:
        names = _group_names(dataset)
    except GraftlabError as err:
        raise GraftlabError(f"{path}: {err}") from None
    files = [path] if path.is_file() else _parquet_files(path)
    orphan = fmt == "parquet" and bool(files) and _orphan_part(files[0])
    return infer_metadata(names, source=fmt, columns=dataset.schema.names, orphan=orphan)


# --------------------------------------------------------------------------- reading

def read(
    path: PathLike,
    *,
    steps: Optional[tuple[Optional[int], Optional[int]]] = None,
    groups: Optional[Iterable[str]] = None,
    columns: Optional[Iterable[str]] = None,
) -> pd.DataFrame:
    """:func:`graftlab.read_trace` for a foreign trace: the same columns, order and ``attrs``.

    Rows come sorted by step, then by first appearance of the group. ``norm_m``/``norm_d`` that the
    table lacks are NaN (unknown); a ``ratio`` it lacks is ``norm_m / norm_d`` (:func:`_ratio`).
    Float columns come as float64, ``step`` as int64, ``group`` as str.
    """
    path = Path(path)
    dataset, fmt = _dataset(path)
    names = dataset.schema.names
    _check_columns(path, names)
    wanted = list(dict.fromkeys(list(COLUMNS) + list(OPTIONAL) + list(columns if columns is not None else names)))
    computed = _computes_ratio(names)
    unknown = [c for c in wanted if c not in names and c not in OPTIONAL and not (c == "ratio" and computed)]
    if unknown:
        raise GraftlabError(f"{path}: trace has no column(s) {', '.join(unknown)}")
    flt = None
    start, stop = steps if steps is not None else (None, None)
    if start is not None:
        flt = ds.field("step") >= start
    if stop is not None:
        flt = (ds.field("step") < stop) if flt is None else flt & (ds.field("step") < stop)
    try:
        meta = metadata(path)
        table = dataset.to_table(columns=[c for c in wanted if c in names], filter=flt)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as err:
        raise GraftlabError(f"{path}: not a readable trace ({_first_line(err)})") from None
    if computed:
        table = table.append_column("ratio", _ratio(path, table))
        names = [*names, "ratio"]
    group = _as_text(table.column("group"))
    if groups is not None:
        keep = pc.is_in(group, value_set=pa.array([str(g) for g in groups], pa.string()))
        table, group = table.filter(keep), group.filter(keep)
    step = _steps(path, table.column("step"))
    order = [g["name"] for g in meta["groups"]]
    rank = pc.index_in(group, value_set=pa.array(order, pa.string())).to_numpy(zero_copy_only=False)
    idx = np.lexsort((rank, step.to_numpy()))
    out = {"step": step.to_numpy()[idx], "group": np.asarray(group.to_numpy(zero_copy_only=False), dtype=object)[idx]}
    _check_unique(path, out["step"], rank[idx], out["group"])
    for c in wanted:
        if c in ("step", "group"):
            continue
        if c not in names:
            out[c] = np.full(len(idx), np.nan)
            continue
        col = table.column(c)
        if c in _FLOATS:
            try:
                col = col.cast(pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise GraftlabError(f"{path}: column {c} must hold numbers, not {col.type}") from None
            out[c] = col.to_numpy(zero_copy_only=False)[idx]  # nulls become NaN: unknown
        else:
            out[c] = col.to_pandas().to_numpy()[idx]
    df = pd.DataFrame(out)
    df.attrs["graftlab"] = meta
    return df


def extent(path: PathLike) -> tuple[int, int]:
    """``(first_step, last_step)`` of a foreign trace (reads its ``step`` column)."""
    path = Path(path)
    dataset, _ = _dataset(path)
    _check_columns(path, dataset.schema.names)
    col = _steps(path, dataset.to_table(columns=["step"]).column("step"))
    if len(col) == 0:
        raise GraftlabError(f"{path}: the trace is empty (no recorded steps)")
    mm = pc.min_max(col).as_py()
    return int(mm["min"]), int(mm["max"])


def info(path: PathLike) -> dict[str, Any]:
    """:func:`graftlab.trace.trace_info` for a foreign trace (``parts`` counts its files; ``columns``
    are those :func:`read` returns, ``computed`` those of them the table does not store)."""
    path = Path(path)
    meta = metadata(path)
    dataset, fmt = _dataset(path)
    files = [path] if path.is_file() else _parquet_files(path)
    col = _steps(path, dataset.to_table(columns=["step"]).column("step"))
    mm = pc.min_max(col).as_py() if len(col) else {"min": None, "max": None}
    columns, computed = list(dataset.schema.names), list(meta["foreign"]["computed"])
    if computed:  # where read_trace puts it
        columns.insert(columns.index("norm_d") + 1, "ratio")
    return {
        "metadata": meta, "parts": len(files), "rows": len(col), "first_step": mm["min"], "last_step": mm["max"],
        "steps": len(pc.unique(col)) if len(col) else 0, "gaps": [], "columns": columns, "computed": computed,
        "bytes": sum(f.stat().st_size for f in files),
    }
