"""From checked parts to rows: the scan under :func:`~graftlab.trace.read_trace`, :func:`~graftlab.trace.read_table`
and the median engine (:func:`scan_ratios`), and the conversion to pandas.

Every read goes through :func:`open_parts` (footers read once and checked, see
:mod:`~graftlab.trace.parts`) and one ``pyarrow.dataset`` scan of those parts, which verifies each
data page's checksum. Group names are mapped to one list (:class:`GroupCodes`): the metadata's order,
then names it lacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from graftlab.errors import GraftlabError
from graftlab.trace import gaps
from graftlab.trace.layout import REQUIRED, STORED, PathLike, part_first_step, trace_files
from graftlab.trace.selection import check_steps
from graftlab.trace.parts import (
    READ_ERRORS, Part, check_part, check_sequence, describe, open_part, parquet_format, trace_metadata,
)

if TYPE_CHECKING:  # pandas is imported where a DataFrame is made: `graftlab info` never needs it
    import pandas as pd


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


def open_parts(path: Path, steps: Optional[tuple[Optional[int], Optional[int]]],
          scan: bool = False) -> tuple[str, dict, list[Part], list[tuple[int, int]]]:
    """The trace's format, metadata, the checked parts that can hold ``steps`` (``scan``: ready to
    be scanned, see :func:`~graftlab.trace.parts.open_part`), and the runs of recorded steps missing
    between parts that meet ``steps`` (:func:`graftlab.trace.gaps.find`)."""
    every = trace_files(path)
    first = open_part(every[0], scan)
    fmt, meta = trace_metadata(path, first)
    files = _prune(every, *steps) if path.is_dir() and steps is not None else every
    parts = [first if f == first.path else open_part(f, scan) for f in files]
    for p in parts:
        check_part(p, fmt, first.key)
    missing: list[tuple[int, int]] = []
    if path.is_dir():
        check_sequence(parts)
        missing = gaps.find(meta, [p.bounds for p in parts], gaps.next_part(every, files), steps)
    return fmt, meta, parts, missing


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
    gaps: list[tuple[int, int]]  # recorded steps missing in the steps asked for (graftlab.trace.gaps)

    @property
    def names(self) -> list[str]:
        return [g["name"] for g in self.meta.get("groups") or []]


def _scanner(path: Path, steps, columns, required: list[str]) -> _Scan:
    import pyarrow.dataset as ds

    fmt, meta, parts, missing = open_parts(path, steps, scan=True)
    start, stop = steps if steps is not None else (None, None)
    stored = [c for c in STORED[fmt] if c in required or (c in ("norm_m", "norm_d") and "ratio" in required)]
    try:
        schemas = [p.schema for p in parts]
        # parts of older writers may differ in a scalar's width (float32 vs float64, int64): the widest wins
        schema = pa.unify_schemas(schemas, promote_options="permissive") if len(schemas) > 1 else schemas[0]
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
    return _Scan(path, fmt, meta, dataset, flt, stored, extras, sum(p.rows for p in parts), missing)


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
        if len(chunk):
            bounds = pc.min_max(chunk.indices)
            if bounds["min"].as_py() < 0 or bounds["max"].as_py() >= len(d):
                raise GraftlabError(f"{self.path}: damaged group column (a name index outside its dictionary)")
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

    For engines that fill their own arrays (:mod:`graftlab.distill.medians`): the whole trace is never held
    as columns. Batches come in part order; rows are as stored (the caller checks their order). The
    footers are checked as for :func:`read_trace`; ``codes.names`` lists the groups (metadata order,
    then unknown names as met). Returns ``(batches, codes, metadata)``.
    """
    from graftlab.trace import foreign

    steps = check_steps(steps)
    if foreign.is_foreign(path):
        return foreign.scan_ratios(path, steps=steps)
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


def scan_batches(
    path: PathLike, required: Iterable[str], optional: Iterable[str] = (), *,
    steps: Optional[tuple[Optional[int], Optional[int]]] = None,
) -> tuple[Iterator[pa.RecordBatch], dict[str, Any]]:
    """Stream a trace's ``required`` columns (of :data:`REQUIRED`) and those of ``optional`` extras it
    holds, one ``pyarrow.RecordBatch`` at a time, for a pass that needs no whole column (e.g. the
    divergence marks of a 40M-row trace). ``group`` stays dictionary-encoded as stored; a ``/2``
    trace's ``ratio`` is computed per batch. Footers are checked as for :func:`read_trace`.
    Returns ``(batches, metadata)``."""
    from graftlab.trace import foreign

    steps = check_steps(steps)
    if foreign.is_foreign(path):  # norm columns the table lacks are left out of its batches
        return foreign.scan_batches(path, required, optional, steps=steps)
    path = Path(path)
    required = list(required)
    scan = _scanner(path, steps, None, required)
    extras = [c for c in optional if c in scan.extras]

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for batch in scan.dataset.to_batches(columns=scan.stored + extras, filter=scan.filter):
                if batch.num_rows == 0:
                    continue
                if batch.column("step").null_count:
                    raise GraftlabError(f"{path}: column step has missing values")
                if "ratio" in required and "ratio" not in batch.schema.names:
                    ratio = pc.divide(batch.column("norm_m"), batch.column("norm_d"))
                    batch = pa.RecordBatch.from_arrays([*batch.columns, ratio], [*batch.schema.names, "ratio"])
                yield batch
        except READ_ERRORS as err:
            raise GraftlabError(f"{path}: not a readable trace ({describe(err)})") from None

    return batches(), scan.meta


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
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
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
