"""Reading a trace: its metadata, its rows as an Arrow table or a DataFrame, its extent from the footers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from graftlab.errors import GraftlabError
from graftlab.trace.layout import FORMAT_1, REQUIRED, STORED, PathLike, part_first_step, trace_files
if TYPE_CHECKING:  # pandas is imported where a DataFrame is made: `graftlab info` never needs it
    import pandas as pd

from graftlab.trace.parts import (
    READ_ERRORS, Part, check_part, check_sequence, describe, open_part, parquet_format, step_bounds, trace_metadata,
)


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
    """The run metadata of a trace (``_graftlab.json`` of a ``/2`` directory, else the first part's footer).

    Raises :class:`~graftlab.errors.GraftlabError` when ``path`` is not a readable graftlab trace.
    """
    path = Path(path)
    return trace_metadata(path, open_part(trace_files(path)[0]))[1]


def _open(path: Path, steps: Optional[tuple[Optional[int], Optional[int]]],
          scan: bool = False) -> tuple[str, dict, list[Part]]:
    """The trace's format, metadata and the checked parts that can hold ``steps`` (``scan``: ready to
    be scanned, see :func:`~graftlab.trace.parts.open_part`)."""
    files = trace_files(path)
    first = open_part(files[0], scan)
    fmt, meta = trace_metadata(path, first)
    if path.is_dir() and steps is not None:
        files = _prune(files, *steps)
    parts = [first if f == first.path else open_part(f, scan) for f in files]
    for p in parts:
        check_part(p, fmt, first.key)
    if path.is_dir():
        check_sequence(parts)
    return fmt, meta, parts


@dataclass
class _Scan:
    """What a read needs once the footers are checked: the dataset, its filter, the columns."""

    path: Path
    fmt: str
    meta: dict[str, Any]
    dataset: Any
    filter: Any
    stored: list[str]
    extras: list[str]
    rows: int  # rows of the parts scanned: a bound on what the filter keeps

    @property
    def names(self) -> list[str]:
        return [g["name"] for g in self.meta.get("groups") or []]


def _scanner(path: Path, steps, columns, required: list[str]) -> _Scan:
    import pyarrow.dataset as ds

    fmt, meta, parts = _open(path, steps, scan=True)
    start, stop = steps if steps is not None else (None, None)
    stored = [c for c in STORED[fmt] if c in required or (c in ("norm_m", "norm_d") and "ratio" in required)]
    try:
        schemas = [p.schema for p in parts]
        schema = pa.unify_schemas(schemas) if len(schemas) > 1 else schemas[0]
    except READ_ERRORS as err:
        raise GraftlabError(f"{path}: parts disagree on column types ({describe(err)})") from None
    # every part's group is read dictionary-encoded (parquet_format); the scan keeps it so
    i = schema.get_field_index("group")
    schema = schema.set(i, schema.field(i).with_type(pa.dictionary(pa.int32(), pa.string())))
    # a /2 ratio is norm_m / norm_d by definition: one a writer stored anyway is not read
    extras = [c for c in schema.names if c not in REQUIRED]
    if columns is not None:
        wanted = list(dict.fromkeys(columns))
        unknown = [c for c in wanted if c not in schema.names and c not in REQUIRED]
        if unknown:
            raise GraftlabError(f"{path}: trace has no column(s) {', '.join(unknown)}")
        extras = [c for c in extras if c in wanted]
    flt = None
    if start is not None:
        flt = ds.field("step") >= start
    if stop is not None:
        cond = ds.field("step") < stop
        flt = cond if flt is None else flt & cond
    fmt_, fs = parquet_format()
    dataset = ds.FileSystemDataset([p.fragment() for p in parts], schema, fmt_, fs)
    return _Scan(path, fmt, meta, dataset, flt, stored, extras, sum(p.rows for p in parts))


def read_table(
    path: PathLike,
    *,
    steps: Optional[tuple[Optional[int], Optional[int]]] = None,
    groups: Optional[Iterable[str]] = None,
    columns: Optional[Iterable[str]] = None,
    required: Iterable[str] = REQUIRED,
) -> tuple[pa.Table, dict[str, Any]]:
    """:func:`read_trace` as an Arrow table, and the run metadata: the engine under the DataFrame.

    ``group`` is ``dictionary<int32, string>`` whose dictionary is the metadata's group order (then
    names the metadata lacks, in order of appearance), the same in every chunk; rows are in step,
    then group order. ``required`` narrows the required columns returned (``("step", "group",
    "ratio")`` reads a ``/1`` trace's norms not at all). Same arguments and errors as :func:`read_trace`.
    """
    path = Path(path)
    required = list(required)
    scan = _scanner(path, steps, columns, required)
    try:
        table = scan.dataset.to_table(columns=scan.stored + scan.extras, filter=scan.filter)
    except READ_ERRORS as err:
        raise GraftlabError(f"{path}: not a readable trace ({describe(err)})") from None
    table = _in_order(table, scan.names, path)
    if groups is not None:
        keep = set(groups)
        group = table.column("group")
        dictionary = group.chunk(0).dictionary.to_pylist() if group.num_chunks else []
        codes = pa.array([i for i, g in enumerate(dictionary) if g in keep], pa.int32())
        table = table.filter(pc.is_in(_indices(group), value_set=codes))
    if "ratio" in required and "ratio" not in table.column_names:
        # /2: the ratio is the float32 quotient of the stored norms, as the Graft computed it
        ratio = pc.divide(table.column("norm_m"), table.column("norm_d"))
        table = table.add_column(table.column_names.index("norm_d") + 1, "ratio", ratio)
    order = [c for c in REQUIRED if c in required] + scan.extras
    return table.select(order).replace_schema_metadata(None), scan.meta


class GroupCodes:
    """Maps each batch's group dictionary to positions in one list of names: the metadata's order,
    then names it lacks as they come."""

    def __init__(self, names: list[str], path: Path) -> None:
        self.names = list(names)
        self.position = {n: i for i, n in enumerate(self.names)}
        self.reference = pa.array(self.names, pa.string())
        self.path = path

    def __call__(self, chunk: pa.Array) -> pa.Array:
        """int32 positions of ``chunk``'s names (a dictionary or string array)."""
        if not pa.types.is_dictionary(chunk.type):
            chunk = chunk.dictionary_encode()
        if chunk.null_count:
            raise GraftlabError(f"{self.path}: column group has missing names")
        d = chunk.dictionary
        if d.type != pa.string():
            d = d.cast(pa.string())
        if d.equals(self.reference):
            return chunk.indices.cast(pa.int32())
        pos = []
        for name in d.to_pylist():
            if name not in self.position:
                self.position[name] = len(self.names)
                self.names.append(name)
            pos.append(self.position[name])
        return pc.take(pa.array(pos, pa.int32()), chunk.indices)


def scan_ratios(
    path: PathLike, *, steps: Optional[tuple[Optional[int], Optional[int]]] = None,
) -> tuple[Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], GroupCodes, dict[str, Any]]:
    """Stream a trace's ``(step, group position, ratio)`` as numpy arrays, one record batch at a time.

    For engines that fill their own arrays (:mod:`graftlab.medians`): the whole trace is never held
    as columns. Batches come in part order; rows are as stored (the caller checks their order). The
    footers are checked as for :func:`read_trace`; ``codes.names`` lists the groups (metadata order,
    then unknown names as met). Returns ``(batches, codes, metadata)``.
    """
    path = Path(path)
    scan = _scanner(path, steps, [], ["step", "group", "ratio"])
    codes = GroupCodes(scan.names, path)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        try:
            for batch in scan.dataset.to_batches(columns=scan.stored, filter=scan.filter):
                if batch.num_rows == 0:
                    continue
                if batch.column("step").null_count:
                    raise GraftlabError(f"{path}: column step has missing values")
                if "ratio" in scan.stored:
                    ratio = batch.column("ratio")
                else:
                    ratio = pc.divide(batch.column("norm_m"), batch.column("norm_d"))
                yield (batch.column("step").to_numpy(), codes(batch.column("group")).to_numpy(),
                       ratio.to_numpy(zero_copy_only=False))
        except READ_ERRORS as err:
            raise GraftlabError(f"{path}: not a readable trace ({describe(err)})") from None

    return batches(), codes, scan.meta


def _indices(group: pa.ChunkedArray) -> pa.ChunkedArray:
    return pa.chunked_array([c.indices for c in group.chunks], pa.int32())


def _unified_groups(group: pa.ChunkedArray, names: list[str], path: Path) -> pa.ChunkedArray:
    """``group`` with one dictionary in every chunk: ``names``, then unknown names as they come."""
    codes = GroupCodes(names, path)
    out = [codes(chunk) for chunk in group.chunks]
    dictionary = pa.array(codes.names, pa.string())
    kind = pa.dictionary(pa.int32(), pa.string())
    return pa.chunked_array([pa.DictionaryArray.from_arrays(i, dictionary) for i in out], kind)


def _in_order(table: pa.Table, names: list[str], path: Path) -> pa.Table:
    """Rows sorted by step, then by group order; a (step, group) held twice is an error.

    A recorded trace is already in this order, which one pass over each chunk confirms; only
    otherwise are the rows sorted.
    """
    if table.column("step").null_count:
        raise GraftlabError(f"{path}: column step has missing values")
    group = _unified_groups(table.column("group"), names, path)
    table = table.set_column(table.column_names.index("group"), "group", group)
    step_chunks = table.column("step").chunks
    ordered, last = True, None
    for s_chunk, g_chunk in zip(step_chunks, group.chunks):
        if len(s_chunk) == 0:
            continue
        s, g = s_chunk.to_numpy(), g_chunk.indices.to_numpy()
        if last is not None and not (s[0] > last[0] or (s[0] == last[0] and g[0] > last[1])):
            ordered = False
            break
        ds_, dg = np.diff(s), np.diff(g)
        if not ((ds_ > 0) | ((ds_ == 0) & (dg > 0))).all():
            ordered = False
            break
        last = (s[-1], g[-1])
    if ordered:
        return table
    step = table.column("step").to_numpy()
    code = _indices(group).to_numpy()
    order = np.lexsort((code, step))
    s, g = step[order], code[order]
    dup = np.flatnonzero((np.diff(s) == 0) & (np.diff(g) == 0))
    if dup.size:
        name = group.chunk(0).dictionary[int(g[dup[0]])].as_py()
        raise GraftlabError(f"{path}: step {int(s[dup[0]])} of group {name!r} appears more than once "
                            "(a duplicated part, or rows written twice?)")
    return table.take(pa.array(order))


def read_trace(
    path: PathLike,
    *,
    steps: Optional[tuple[Optional[int], Optional[int]]] = None,
    groups: Optional[Iterable[str]] = None,
    columns: Optional[Iterable[str]] = None,
) -> pd.DataFrame:
    """Read a trace as one long DataFrame, one row per recorded (step, group).

    Columns: ``step`` (int64, 0-based optimizer step), ``group`` (pandas Categorical of the group
    names, categories in the metadata's group order: compare, filter and group by it as strings),
    ``norm_m`` and ``norm_d`` (float32, Euclidean norms ``||w_M - w_t||`` and ``||w_D - w_t||`` of
    M's and D's steps on the group, in the parameters' units), ``ratio`` (float32, ``norm_m /
    norm_d``, dimensionless: the implicit learning-rate correction of the paper's Algorithm 1 that
    Section 5 distills; not finite where D's step was zero; a ``graftlab.trace/2`` trace stores the
    norms only and this is their float32 quotient, bit-identical to what the Graft computed), then
    the extra per-step columns the trace holds (``lr``, ``loss``, ...). A whole trace has (recorded
    steps) x (groups) rows, sorted by step, then by the metadata's group order. The run metadata
    (see :mod:`graftlab.trace`) is in ``df.attrs["graftlab"]``.

    ``steps=(start, stop)`` keeps ``start <= step < stop`` (either end may be None) and reads only
    the part files and row groups that can hold those steps. ``groups`` (names) and ``columns``
    (extra columns; the required ones always come) narrow the read the same way.

    Raises :class:`~graftlab.errors.GraftlabError` when ``path`` does not exist, holds no part files
    or a stray copy of one, is not readable Parquet (a damaged footer, or a data page whose checksum
    fails), has no graftlab metadata or a format this graftlab does not read, has a part that lacks a
    required column or holds one of the wrong type, holds a step twice, or lacks a column named in
    ``columns``.
    """
    path = Path(path)
    df = None
    if groups is None:
        scan = _scanner(path, steps, columns, list(REQUIRED))
        df = _stream_to_pandas(scan)
        meta = scan.meta
    if df is None:  # rows out of order (or a groups filter): read whole, sort, convert
        table, meta = read_table(path, steps=steps, groups=groups, columns=columns)
        df = _to_pandas(table)
        del table
    if groups is not None:
        df["group"] = df["group"].cat.remove_unused_categories()
    df.attrs["graftlab"] = meta
    return df


def _stream_to_pandas(scan: _Scan) -> "Optional[pd.DataFrame]":
    """The scan's rows as a DataFrame, copied batch by batch into one preallocated array per column
    (each Arrow batch is released once copied: one pass, one copy). None when the rows are not in
    step and group order (then the caller sorts)."""
    import pandas as pd

    n, names = scan.rows, scan.stored + scan.extras
    types = {f.name: f.type for f in scan.dataset.schema}
    codes = GroupCodes(scan.names, scan.path)
    out: dict[str, Any] = {"step": np.empty(n, np.int64), "group": np.empty(n, np.int32)}
    for c in ("norm_m", "norm_d", "ratio"):
        out[c] = np.empty(n, np.float32)
    for c in scan.extras:
        out[c] = np.empty(n, types[c].to_pandas_dtype()) if pa.types.is_floating(types[c]) else []
    o, last = 0, None
    try:
        for batch in scan.dataset.to_batches(columns=names, filter=scan.filter):
            m = batch.num_rows
            if m == 0:
                continue
            step = batch.column("step")
            if step.null_count:
                raise GraftlabError(f"{scan.path}: column step has missing values")
            s, g = step.to_numpy(), codes(batch.column("group")).to_numpy()
            if last is not None and not (s[0] > last[0] or (s[0] == last[0] and g[0] > last[1])):
                return None
            ds_, dg = np.diff(s), np.diff(g)
            if not ((ds_ > 0) | ((ds_ == 0) & (dg > 0))).all():
                return None
            last = (s[-1], g[-1])
            out["step"][o:o + m] = s
            out["group"][o:o + m] = g
            for c in names[2:]:
                col = batch.column(c)
                if isinstance(out[c], list):
                    out[c].append(col.to_pandas())
                else:
                    out[c][o:o + m] = col.to_numpy(zero_copy_only=False)
            if "ratio" not in scan.stored:  # /2: the float32 quotient, as the Graft computed it
                with np.errstate(divide="ignore", invalid="ignore"):
                    np.divide(out["norm_m"][o:o + m], out["norm_d"][o:o + m], out=out["ratio"][o:o + m])
            o += m
    except READ_ERRORS as err:
        raise GraftlabError(f"{scan.path}: not a readable trace ({describe(err)})") from None
    cols: dict[str, Any] = {}
    for c in [*REQUIRED, *scan.extras]:
        if c == "group":
            cols[c] = pd.Categorical.from_codes(out[c][:o], categories=pd.Index(codes.names, dtype=object))
        elif isinstance(out[c], list):
            cols[c] = (pd.concat(out[c], ignore_index=True) if out[c] else pd.Series([], dtype=object)).to_numpy()
        else:
            cols[c] = out[c][:o]
    return pd.DataFrame(cols, copy=False)


def _to_pandas(table: pa.Table) -> "pd.DataFrame":
    """One numpy array per column and a Categorical from the group codes, without consolidating
    columns into blocks (pyarrow's generic conversion costs several times the read on long traces).
    Each Arrow column is released once converted."""
    import pandas as pd

    names = table.column_names
    cols: dict[str, Any] = {}
    for name in names:
        col = table.column(0)
        table = table.drop_columns([name])
        if name == "group":
            categories = col.chunk(0).dictionary.to_pylist() if col.num_chunks else []
            codes = (np.concatenate([c.indices.to_numpy() for c in col.chunks]) if col.num_chunks
                     else np.array([], np.int32))
            cols[name] = pd.Categorical.from_codes(codes, categories=pd.Index(categories, dtype=object))
        elif pa.types.is_floating(col.type) or (pa.types.is_integer(col.type) and col.null_count == 0):
            cols[name] = col.to_numpy()
        else:
            cols[name] = col.to_pandas()
        del col
    return pd.DataFrame(cols, copy=False)


def group_table(meta: dict[str, Any]) -> pd.DataFrame:
    """The metadata's groups as a DataFrame indexed by group name (kind, ffn, block, numel, ...)."""
    import pandas as pd

    groups = meta.get("groups") or []
    if not groups:
        return pd.DataFrame(columns=["kind", "ffn", "block", "numel"]).rename_axis("group")
    return pd.DataFrame(groups).set_index("name").rename_axis("group")


def _first_bounds(path: Path, files: Iterable[Path], fmt: str, key: Optional[bytes]) -> Optional[tuple[int, int]]:
    for f in files:
        part = open_part(f)
        check_part(part, fmt, key)
        bounds = step_bounds(part)
        if bounds is not None:
            return bounds
    return None


def trace_extent(path: PathLike) -> tuple[int, int]:
    """``(first_step, last_step)`` recorded in a trace, from Parquet footers only.

    Only the footers of the first and last parts that hold rows are read, so this costs the same on
    a trace of thousands of parts. Raises :class:`~graftlab.errors.GraftlabError` when ``path`` is
    not a readable trace, lacks a required column, or holds no rows.
    """
    path = Path(path)
    files = trace_files(path)
    first = open_part(files[0])
    fmt, _ = trace_metadata(path, first)
    lo = _first_bounds(path, files, fmt, first.key)
    hi = _first_bounds(path, reversed(files), fmt, first.key)
    if lo is None or hi is None:
        raise GraftlabError(f"{path}: the trace is empty (no recorded steps)")
    return lo[0], hi[1]


def trace_info(path: PathLike) -> dict[str, Any]:
    """What a trace holds, from the Parquet footers only (no data pages are read).

    Returns ``{"metadata", "format", "parts", "rows", "first_step", "last_step", "steps", "columns",
    "bytes"}``; ``steps`` counts recorded steps (rows / groups). Every part's footer is checked as
    :func:`read_trace` checks it, so a duplicated or damaged part is an error here too.
    """
    path = Path(path)
    fmt, meta, parts = _open(path, None)
    if not path.is_dir():
        parts[0].bounds = step_bounds(parts[0])
    columns: list[str] = []
    for p in parts:
        for name in p.schema.names:
            if name not in columns:
                columns.append(name)
    if fmt != FORMAT_1 and "ratio" not in columns:
        columns.insert(columns.index("norm_d") + 1, "ratio")  # computed on read
    bounds = [p.bounds for p in parts if p.bounds is not None]
    rows = sum(p.rows for p in parts)
    n_groups = len(meta.get("groups") or []) or 1
    return {"metadata": meta, "format": fmt, "parts": len(parts), "rows": rows,
            "first_step": min(b[0] for b in bounds) if bounds else None,
            "last_step": max(b[1] for b in bounds) if bounds else None,
            "steps": rows // n_groups, "columns": columns, "bytes": sum(p.path.stat().st_size for p in parts)}
