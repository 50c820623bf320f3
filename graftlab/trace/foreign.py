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
import pyarrow.parquet as pq

from graftlab.errors import GraftlabError
from graftlab.trace import tables
from graftlab.trace.layout import FORMAT, METADATA_KEY, SIDECAR, frame_metadata
from graftlab.trace.selection import check_group_names, check_known, check_steps

PathLike = Union[str, os.PathLike]

COLUMNS = ("step", "group", "ratio")
OPTIONAL = ("norm_m", "norm_d")  # with both, ``ratio`` may be left out: it is computed from them
CSV_SUFFIX = tables.CSV_SUFFIX


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


_parquet_files = tables.parquet_files


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


def _open(path: Path) -> tables.Table:
    table = tables.Table(path)
    _check_columns(path, table.names)
    if table.fmt == "parquet":
        _check_types(path, table.dataset.schema)
    return table


def _check_types(path: Path, schema: pa.Schema) -> None:
    """GraftlabError, before any row is read, for a ``group`` column that cannot hold names (a
    struct, a list, floats) and a number column that does not hold numbers (text, true/false)."""
    t = schema.field("group").type
    value = t.value_type if pa.types.is_dictionary(t) else t
    if not (pa.types.is_string(value) or pa.types.is_large_string(value) or pa.types.is_binary(value)
            or pa.types.is_large_binary(value) or pa.types.is_integer(value)):
        raise GraftlabError(f"{path}: column group must hold group names (text), not {t}")
    for name in ("ratio", *OPTIONAL):
        if name in schema.names:
            t = schema.field(name).type
            if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_decimal(t) or pa.types.is_null(t)):
                raise GraftlabError(f"{path}: column {name} must hold numbers, not {t}")


def _ratio(path: Path, m: Any, d: Any) -> Any:
    """``norm_m / norm_d`` as :func:`graftlab.read_trace` computes it for a ``/2`` trace: float32 when
    both norms are float32 (bit-identical to the Graft's), else float64; not finite where D's is 0."""
    if not (pa.types.is_float32(m.type) and pa.types.is_float32(d.type)):
        try:
            m, d = m.cast(pa.float64()), d.cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise GraftlabError(f"{path}: columns norm_m and norm_d must hold numbers, not "
                                f"{m.type} and {d.type}") from None
    return pc.divide(m, d)


def _floats(path: Path, col: Any, name: str) -> np.ndarray:
    """A float column as float64 numpy (empty values NaN: unknown); GraftlabError if not numbers."""
    try:
        return col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise GraftlabError(f"{path}: column {name} must hold numbers, not {col.type}") from None


def _check_unique(path: Path, step: np.ndarray, rank: np.ndarray, group: Any) -> None:
    """GraftlabError naming the first (step, group) pair that two rows hold (``step`` and ``rank``
    in sorted row order, ``group(i)`` the name of row ``i``): its ratio would be ambiguous."""
    if len(step) < 2:
        return
    dup = np.flatnonzero((step[1:] == step[:-1]) & (rank[1:] == rank[:-1]))
    if len(dup):
        i = int(dup[0])
        raise GraftlabError(f"{path}: step {int(step[i])} of group {group(i)!r} appears in more than one row "
                            f"({len(dup)} repeated (step, group) row(s)); keep one row per step and group")


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
    """The inferred metadata of the foreign trace at ``path`` (one streamed pass over its ``step``
    and ``group`` columns, :func:`graftlab.trace.tables.summary`; kept while the files are unchanged)."""
    path = Path(path)
    return dict(_metadata(path, tables._signature(path)))


@functools.lru_cache(maxsize=4)
def _metadata(path: Path, signature: tuple) -> dict[str, Any]:
    table = _open(path)
    names = tables.summary(path).names
    files = table.files()
    orphan = table.fmt == "parquet" and bool(files) and _orphan_part(files[0])
    return infer_metadata(names, source=table.fmt, columns=table.names, orphan=orphan)


# --------------------------------------------------------------------------- reading

def _wanted(path: Path, names: list[str], columns: Optional[Iterable[str]]) -> list[str]:
    wanted = list(dict.fromkeys(list(COLUMNS) + list(OPTIONAL) + list(columns if columns is not None else names)))
    computed = _computes_ratio(names)
    unknown = [c for c in wanted if c not in names and c not in OPTIONAL and not (c == "ratio" and computed)]
    if unknown:
        raise GraftlabError(f"{path}: trace has no column(s) {', '.join(unknown)}")
    return wanted


def read(
    path: PathLike,
    *,
    steps: Optional[tuple[Optional[int], Optional[int]]] = None,
    groups: Optional[Iterable[str]] = None,
    columns: Optional[Iterable[str]] = None,
) -> pd.DataFrame:
    """:func:`graftlab.read_trace` for a foreign trace: the same columns, order and ``attrs``.

    Rows come sorted by step, then by first appearance of the group; ``group`` is a Categorical
    whose categories are the groups in that order (as :func:`graftlab.read_trace` gives a graftlab
    trace's). ``norm_m``/``norm_d`` that the table lacks are NaN (unknown); a ``ratio`` it lacks is
    ``norm_m / norm_d`` (:func:`_ratio`). Float columns come as float64, ``step`` as int64. Only the
    columns asked for are read, and of a Parquet table only the row groups that can hold ``steps``;
    a CSV file is parsed block by block, keeping the rows in ``steps``. A table that stores
    ``ratio`` beside both norms keeps its ``ratio``, with one ``UserWarning`` counting the rows
    where it disagrees with ``norm_m / norm_d`` (:class:`graftlab.trace.tables.RatioCheck`).
    """
    steps, groups = check_steps(steps), check_group_names(groups)
    path = Path(path)
    table = _open(path)
    names = table.names
    wanted = _wanted(path, names, columns)
    meta = metadata(path)
    order = tables.NameOrder([g["name"] for g in meta["groups"]])
    check_known(groups, order.names, path)
    stored = [c for c in wanted if c in names]
    keep = None if groups is None else pa.array(groups, pa.string())
    parts: dict[str, list] = {c: [] for c in stored}
    codes = []
    for batch in table.batches(stored, steps):
        code = order.codes(batch.column("group"))
        if keep is not None:
            mask = np.isin(code, np.asarray(pc.index_in(keep, value_set=order.known).drop_null()))
            batch, code = batch.filter(pa.array(mask)), code[mask]
        codes.append(code)
        parts["step"].append(tables.steps_column(path, batch.column("step")))
        for c in stored:
            if c not in ("step", "group"):
                parts[c].append(batch.column(c))
    code = np.concatenate(codes) if codes else np.array([], np.int32)
    step = (np.concatenate([np.asarray(s) for s in parts["step"]]) if codes else np.array([], np.int64))
    idx = np.lexsort((code, step))
    step, code = step[idx], code[idx]
    categories = pd.Index(order.names, dtype=object)
    _check_unique(path, step, code, lambda i: categories[code[i]])
    out: dict[str, Any] = {"step": step, "group": pd.Categorical.from_codes(code, categories=categories)}
    cols = {c: (pa.chunked_array(parts[c]) if parts[c] else pa.chunked_array([], table.schema([c]).field(0).type))
            for c in stored if c not in ("step", "group")}
    if _computes_ratio(names):
        cols["ratio"] = _ratio(path, cols["norm_m"], cols["norm_d"])
    for c in wanted:
        if c in ("step", "group"):
            continue
        if c not in cols:
            out[c] = np.full(len(idx), np.nan)
            continue
        col = cols[c]
        if c in tables.FLOATS:
            try:
                col = col.cast(pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise GraftlabError(f"{path}: column {c} must hold numbers, not {col.type}") from None
            out[c] = col.to_numpy()[idx]  # nulls become NaN: unknown
        else:
            out[c] = col.to_pandas().to_numpy()[idx]
    if all(c in stored for c in ("ratio", *OPTIONAL)):  # all three read anyway: are they one thing?
        check = tables.RatioCheck()
        check.add(out["ratio"], out["norm_m"], out["norm_d"], step, lambda i: categories[code[i]])
        check.warn(path)
    df = pd.DataFrame(out)
    if groups is not None:
        df["group"] = df["group"].cat.remove_unused_categories()
    df.attrs["graftlab"] = frame_metadata(meta)
    return df


def extent(path: PathLike) -> tuple[int, int]:
    """``(first_step, last_step)`` of a foreign trace (:func:`graftlab.trace.tables.summary`)."""
    path = Path(path)
    _open(path)
    s = tables.summary(path)
    if s.rows == 0:
        raise GraftlabError(f"{path}: the trace is empty (no recorded steps)")
    return int(s.first), int(s.last)


def info(path: PathLike) -> dict[str, Any]:
    """:func:`graftlab.trace.trace_info` for a foreign trace (``parts`` counts its files; ``columns``
    are those :func:`read` returns, ``computed`` those of them the table does not store)."""
    path = Path(path)
    meta = metadata(path)
    table = _open(path)
    s = tables.summary(path)
    files = table.files()
    columns, computed = list(table.names), list(meta["foreign"]["computed"])
    if computed:  # where read_trace puts it
        columns.insert(columns.index("norm_d") + 1, "ratio")
    return {
        "metadata": meta, "parts": len(files), "rows": s.rows, "first_step": s.first, "last_step": s.last,
        "steps": tables.distinct_steps(path), "gaps": [], "columns": columns, "computed": computed,
        "bytes": sum(f.stat().st_size for f in files),
    }


# --------------------------------------------------------------------------- streaming

def scan_ratios(path: PathLike, *, steps: Optional[tuple[Optional[int], Optional[int]]] = None):
    """:func:`graftlab.trace.scanning.scan_ratios` for a foreign trace: ``(batches, codes, metadata)``,
    the batches ``(step int64, group position int32, ratio)`` numpy arrays in row order, ``codes.names``
    the groups in order of first appearance. Only ``step``, ``group`` and the ratio (or the norms
    it is computed from) are read."""
    steps = check_steps(steps)
    path = Path(path)
    table = _open(path)
    meta = metadata(path)
    codes = tables.NameOrder([g["name"] for g in meta["groups"]])
    computed = _computes_ratio(table.names)
    cols = ["step", "group", *(OPTIONAL if computed else ("ratio",))]

    def batches():
        for batch in table.batches(cols, steps):
            ratio = (_ratio(path, batch.column("norm_m"), batch.column("norm_d")) if computed
                     else batch.column("ratio"))
            if not pa.types.is_floating(ratio.type):
                try:
                    ratio = ratio.cast(pa.float64())
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise GraftlabError(f"{path}: column ratio must hold numbers, not {ratio.type}") from None
            yield (np.asarray(tables.steps_column(path, batch.column("step"))), codes.codes(batch.column("group")),
                   ratio.to_numpy(zero_copy_only=False))

    return batches(), codes, meta


def scan_batches(path: PathLike, required: Iterable[str], optional: Iterable[str] = (), *,
                 steps: Optional[tuple[Optional[int], Optional[int]]] = None):
    """:func:`graftlab.trace.scanning.scan_batches` for a foreign trace: ``(batches, metadata)``.
    Norm columns the table lacks are left out of the batches (unknown, not NaN); ``ratio`` is
    computed per batch where the table has the norms only."""
    steps = check_steps(steps)
    path = Path(path)
    table = _open(path)
    meta = metadata(path)
    required = list(required)
    computed = _computes_ratio(table.names)
    cols = [c for c in required if c in table.names]
    if "ratio" in required and computed:
        cols += [c for c in OPTIONAL if c not in cols]
    cols += [c for c in optional if c in table.names and c not in cols]

    check = tables.RatioCheck() if all(c in cols for c in ("ratio", *OPTIONAL)) else None

    def batches():
        for batch in table.batches(cols, steps):
            names = list(batch.schema.names)
            arrays = [tables.steps_column(path, c) if n == "step" else c for n, c in zip(names, batch.columns)]
            if "ratio" in required and computed:
                arrays.append(_ratio(path, batch.column("norm_m"), batch.column("norm_d")))
                names.append("ratio")
            if check is not None:
                floats = [_floats(path, batch.column(c), c) for c in ("ratio", *OPTIONAL)]
                check.add(*floats, arrays[names.index("step")], lambda i, g=batch.column("group"): g[i].as_py())
            yield pa.RecordBatch.from_arrays(arrays, names)
        if check is not None:
            check.warn(path, stacklevel=2)

    return batches(), meta
