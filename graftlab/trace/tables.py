"""Streaming the rows of a table another tool wrote (:mod:`graftlab.trace.foreign`), in bounded memory.

A Parquet table (a file, or a directory of files with any names, hive partitions included) is a
``pyarrow.dataset``: a read names the columns it needs, and a step range becomes a filter that
skips the row groups whose ``step`` statistics lie outside it; ``group`` is read dictionary-encoded
(no string per row). A CSV file is parsed block by block (``pyarrow.csv.open_csv``), so memory
stays bounded whatever the file's size; a step range filters each block.

:func:`summary` is the one pass over ``step`` and ``group`` that metadata, extent and info share:
kept for the next call on the same unchanged files (``distill`` asks three times).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from graftlab.errors import GraftlabError

CSV_SUFFIX = ".csv"
FLOATS = ("ratio", "norm_m", "norm_d", "norm_g")
BATCH_ROWS = 1 << 18  # rows per record batch of a Parquet scan
CSV_BLOCK = 16 << 20  # bytes of CSV text parsed at a time
_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError)
Steps = Optional[tuple[Optional[int], Optional[int]]]


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def parquet_files(directory: Path) -> list[Path]:
    """Data files under ``directory`` as pyarrow's dataset discovery sees them (hidden ones skipped)."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        out.extend(Path(root) / f for f in sorted(files)
                   if not f.startswith((".", "_")) and f.endswith((".parquet", ".pq", ".parq")))
    return out


def is_csv(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(CSV_SUFFIX)


def _csv_types(names: Sequence[str]) -> dict[str, pa.DataType]:
    types = {"step": pa.int64(), "group": pa.string(), **{c: pa.float64() for c in FLOATS}}
    return {k: v for k, v in types.items() if k in names}


class Table:
    """The table at ``path``: its format (``parquet`` or ``csv``), column names, and batches."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if is_csv(path):
            import pyarrow.csv as pcsv

            self.fmt = "csv"
            try:
                with pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 16)) as r:
                    self.names = list(r.schema.names)
            except _ERRORS as err:
                raise GraftlabError(f"{path}: not a readable CSV trace ({first_line(err)})") from None
            return
        self.fmt = "parquet"
        fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns={"group"}))
        try:
            self.dataset = ds.dataset(str(path), format=fmt, partitioning="hive")
        except _ERRORS as err:
            raise GraftlabError(f"{path}: not a readable Parquet table ({first_line(err)})") from None
        self.names = list(self.dataset.schema.names)

    def error(self, err: BaseException) -> GraftlabError:
        what = "CSV trace" if self.fmt == "csv" else "trace"
        return GraftlabError(f"{self.path}: not a readable {what} ({first_line(err)})")

    def batches(self, columns: Sequence[str], steps: Steps = None) -> Iterator[pa.RecordBatch]:
        """The ``columns`` of the rows with ``start <= step < stop``, one record batch at a time, in
        row order. Parquet row groups whose statistics rule the range out are not read."""
        start, stop = steps if steps is not None else (None, None)
        columns = list(columns)
        try:
            if self.fmt == "parquet":
                flt = None
                if start is not None:
                    flt = ds.field("step") >= start
                if stop is not None:
                    flt = (ds.field("step") < stop) if flt is None else flt & (ds.field("step") < stop)
                for batch in self.dataset.to_batches(columns=columns, filter=flt, batch_size=BATCH_ROWS):
                    if batch.num_rows:
                        yield batch
                return
            import pyarrow.csv as pcsv

            opts = pcsv.ConvertOptions(column_types=_csv_types(self.names), include_columns=columns,
                                       strings_can_be_null=False)
            with pcsv.open_csv(self.path, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK),
                               convert_options=opts) as reader:
                for batch in reader:
                    if (start is not None or stop is not None) and batch.num_rows:
                        step, keep = batch.column("step"), None
                        if start is not None:
                            keep = pc.greater_equal(step, start)
                        if stop is not None:
                            below = pc.less(step, stop)
                            keep = below if keep is None else pc.and_(keep, below)
                        batch = batch.filter(keep)
                    if batch.num_rows:
                        yield batch
        except _ERRORS as err:
            raise self.error(err) from None

    def schema(self, columns: Sequence[str]) -> pa.Schema:
        """The schema :meth:`batches` gives ``columns`` (for an empty read)."""
        if self.fmt == "parquet":
            return pa.schema([self.dataset.schema.field(c) for c in columns])
        types = _csv_types(self.names)
        return pa.schema([(c, types.get(c, pa.string())) for c in columns])

    def step_bounds(self) -> Optional[tuple[int, int, int]]:
        """``(rows, first step, last step)`` from the Parquet footers alone, when ``step`` is an
        signed integer column whose statistics every row group holds; else None (the column is read)."""
        # unsigned steps are read and checked (a uint64 past 2**63 - 1 is no step number)
        if self.fmt != "parquet" or not pa.types.is_signed_integer(self.dataset.schema.field("step").type):
            return None
        import pyarrow.parquet as pq

        rows, lo, hi = 0, None, None
        try:
            for f in self.files():
                meta = pq.ParquetFile(f).metadata
                i = meta.schema.to_arrow_schema().get_field_index("step")
                if i < 0:
                    return None
                for r in range(meta.num_row_groups):
                    rg = meta.row_group(r)
                    if rg.num_rows == 0:
                        continue
                    st = rg.column(i).statistics
                    if st is None or not st.has_min_max or st.null_count:
                        return None
                    rows += rg.num_rows
                    lo = st.min if lo is None else min(lo, st.min)
                    hi = st.max if hi is None else max(hi, st.max)
        except _ERRORS:
            return None
        return rows, lo, hi

    def files(self) -> list[Path]:
        return [self.path] if self.path.is_file() else parquet_files(self.path)


def as_dictionary(col: pa.Array) -> pa.DictionaryArray:
    """``col`` dictionary-encoded, with string values (any other type turned into text)."""
    if not pa.types.is_dictionary(col.type):
        col = col.dictionary_encode()
    if not pa.types.is_string(col.dictionary.type):
        try:
            col = pa.DictionaryArray.from_arrays(col.indices, col.dictionary.cast(pa.string()))
        except pa.ArrowInvalid:  # bytes that are not UTF-8: no name a model or a file can hold
            raise GraftlabError("column group holds bytes that are not UTF-8 text; group names must be text") from None
    return col


def steps_column(path: Path, col: pa.Array) -> pa.Array:
    """The ``step`` column as int64; GraftlabError for empty or fractional steps."""
    if col.null_count:
        raise GraftlabError(f"{path}: column step has {col.null_count} empty value(s)")
    if pa.types.is_integer(col.type):
        try:
            return col.cast(pa.int64())  # checked: a uint64 step past 2**63 - 1 is no step number
        except (pa.ArrowInvalid, OverflowError):
            raise GraftlabError(f"{path}: column step holds values beyond the largest step number (2**63 - 1)") from None
    if pa.types.is_floating(col.type):
        vals = np.asarray(col)
        if not (np.isfinite(vals).all() and (vals == np.round(vals)).all()):
            raise GraftlabError(f"{path}: column step must hold whole step numbers")
        return pa.array(vals.astype(np.int64))
    raise GraftlabError(f"{path}: column step must hold integers, not {col.type}")


@dataclass(frozen=True)
class Summary:
    """What one pass over ``step`` and ``group`` finds: group names in order of first appearance,
    rows, first and last step, distinct steps."""

    names: list[str]
    rows: int
    first: Optional[int]
    last: Optional[int]
    steps: Optional[int]  # None: not counted (the footers gave the rest; see :func:`distinct_steps`)


class NameOrder:
    """Group names in order of first appearance, grown batch by batch without a per-row or
    per-name Python loop (a table may hold a million groups)."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.known = pa.array(list(names), pa.string())

    def add(self, col: pa.Array) -> tuple[pa.DictionaryArray, Optional[np.ndarray]]:
        """Learn the names ``col`` holds; returns ``col`` dictionary-encoded and the positions of its
        dictionary's values (None: the dictionary is the names so far, in order)."""
        col = as_dictionary(col)
        d = col.dictionary
        if d.equals(self.known):
            return col, None
        pos = pc.index_in(d, value_set=self.known)
        if pos.null_count:
            used = pc.unique(col.indices)  # in order of first appearance in this batch
            names = d.take(used)
            new = pc.unique(names.filter(pc.is_null(pc.index_in(names, value_set=self.known))))
            if len(new):
                self.known = pa.concat_arrays([self.known, new])
            pos = pc.index_in(d, value_set=self.known)
        return col, np.asarray(pos.fill_null(-1), dtype=np.int32)

    def codes(self, col: pa.Array) -> np.ndarray:
        """int32 positions of ``col``'s names, adding the names not seen yet."""
        col, lookup = self.add(col)
        idx = np.asarray(col.indices.fill_null(0) if col.indices.null_count else col.indices)
        return idx.astype(np.int32, copy=False) if lookup is None else lookup[idx]

    @property
    def names(self) -> list[str]:
        return self.known.to_pylist()

    def check(self, path: Path) -> None:
        """GraftlabError for an empty group name (a group needs a name)."""
        if len(self.known) and pc.any(pc.equal(pc.utf8_length(self.known), 0)).as_py():
            raise GraftlabError(f"{path}: column group holds an empty name (a group needs a name)")


def _signature(path: Path) -> tuple:
    files = [path] if path.is_file() else parquet_files(path)
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)


def summary(path: Path) -> Summary:
    """The :class:`Summary` of the foreign table at ``path`` (one streamed pass; kept while its
    files are unchanged). Raises GraftlabError for empty group names, and for empty, fractional
    or negative steps (a trace's steps count optimizer steps from 0)."""
    return _summary(path, _signature(path))


@functools.lru_cache(maxsize=4)
def _summary(path: Path, signature: tuple) -> Summary:
    table = Table(path)
    order = NameOrder()
    bounds = table.step_bounds()
    if bounds is not None and bounds[0] and bounds[1] >= 0:  # the footers say all: only names to read
        for batch in table.batches(["group"]):
            if batch.column("group").null_count:
                raise GraftlabError(f"{path}: column group has empty values")
            order.add(batch.column("group"))
        order.check(path)
        return Summary(order.names, bounds[0], int(bounds[1]), int(bounds[2]), None)
    rows, lo, hi, negative, first_negative = 0, None, None, 0, None
    distinct: list[np.ndarray] = []
    for batch in table.batches(["step", "group"]):
        group = batch.column("group")
        if group.null_count:
            raise GraftlabError(f"{path}: column group has empty values")
        order.add(group)
        s = np.asarray(steps_column(path, batch.column("step")))
        mn, mx = int(s.min()), int(s.max())
        if mn < 0:
            negative += int((s < 0).sum())
            if first_negative is None:
                first_negative = int(s[np.flatnonzero(s < 0)[0]])
        lo, hi = (mn, mx) if lo is None else (min(lo, mn), max(hi, mx))
        distinct = _distinct(distinct, s)
        rows += len(s)
    if negative:
        raise GraftlabError(f"{path}: step {first_negative} is negative (steps count optimizer steps from 0); "
                            f"{negative} row(s) have a negative step")
    order.check(path)
    n_steps = len(np.unique(np.concatenate(distinct))) if distinct else 0
    return Summary(order.names, rows, lo, hi, n_steps)


def _distinct(found: list[np.ndarray], s: np.ndarray) -> list[np.ndarray]:
    d = np.diff(s)
    if (d >= 0).all():  # the usual order: distinct steps without a hash or a sort
        found.append(s[np.concatenate([[True], d != 0])])
    else:
        found.append(np.unique(s))
    if len(found) > 64:  # bounded however many batches: merge as they come
        found = [np.unique(np.concatenate(found))]
    return found


def distinct_steps(path: Path) -> int:
    """How many distinct steps the foreign table at ``path`` holds (reads ``step`` when the
    footers gave :func:`summary` the rest)."""
    s = summary(path)
    if s.steps is not None:
        return s.steps
    distinct: list[np.ndarray] = []
    for batch in Table(path).batches(["step"]):
        distinct = _distinct(distinct, np.asarray(steps_column(path, batch.column("step"))))
    return len(np.unique(np.concatenate(distinct))) if distinct else 0


# --------------------------------------------------------------------------- ratio beside the norms

RATIO_RTOL = 1e-3  # relative: far above float32 rounding (6e-8), far below any real disagreement
_CHECK_ROWS = 1 << 20  # rows compared at a time: bounded temporaries on a 40M-row table


class RatioCheck:
    """Rows of a table whose stored ``ratio`` disagrees with ``norm_m / norm_d`` (its definition)
    by more than :data:`RATIO_RTOL` relative, counted over the batches a read takes anyway (no
    pass of its own) and said in one warning by :meth:`warn`. Non-finite ratios agree when the
    quotient is the same (inf where D's step was zero); rows whose norms are unknown (NaN, empty)
    are not compared."""

    def __init__(self) -> None:
        self.rows = self.bad = 0
        self.first: Optional[tuple[int, str, float, float]] = None  # step, group, ratio, quotient

    def add(self, ratio: np.ndarray, m: np.ndarray, d: np.ndarray, step: np.ndarray, group) -> None:
        """Compare one batch (float arrays of one length); ``group(i)`` names the group of row ``i``."""
        self.rows += len(ratio)
        for lo in range(0, len(ratio), _CHECK_ROWS):
            r, mm, dd = (np.asarray(a[lo:lo + _CHECK_ROWS], np.float64) for a in (ratio, m, d))
            with np.errstate(divide="ignore", invalid="ignore"):
                q = mm / dd
            bad = np.isfinite(mm) & np.isfinite(dd) & ~np.isclose(r, q, rtol=RATIO_RTOL, atol=0, equal_nan=True)
            n = int(np.count_nonzero(bad))
            if n and self.first is None:
                i = int(np.argmax(bad))
                self.first = (int(step[lo + i]), str(group(lo + i)), float(r[i]), float(q[i]))
            self.bad += n

    def warn(self, path: Path, stacklevel: int = 4) -> None:
        if not self.bad:
            return
        import warnings

        step, group, r, q = self.first
        warnings.warn(f"{path}: column ratio disagrees with norm_m / norm_d (its definition) by more than "
                      f"{RATIO_RTOL:g} relative in {self.bad} of {self.rows} rows (first: step {step}, group "
                      f"{group!r}, ratio {r:.6g} against {q:.6g}); the table's column ratio is used (leave it "
                      "out of the table to use the norms' quotient)", UserWarning, stacklevel=stacklevel)
