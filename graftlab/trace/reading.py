"""Reading a trace: its metadata, its rows as an Arrow table or a DataFrame, its extent from the footers."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from graftlab.errors import GraftlabError
from graftlab.trace.gaps import describe as describe_gaps
from graftlab.trace.layout import FORMAT_1, REQUIRED, PathLike, frame_metadata, trace_files
from graftlab.trace.parts import READ_ERRORS, check_part, describe, open_part, step_bounds, trace_metadata
from graftlab.trace.selection import check_group_names, check_known, check_steps
from graftlab.trace.scanning import (
    _in_order, _indices, _scanner, _stream_to_pandas, _to_pandas, open_parts, scan_ratios,
)

if TYPE_CHECKING:  # pandas is imported where a DataFrame is made: `graftlab info` never needs it
    import pandas as pd

__all__ = [
    "group_table", "read_metadata", "read_table", "read_trace", "scan_ratios", "trace_extent", "trace_info",
    "with_ratio",
]


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The run metadata of a trace (``_graftlab.json`` of a ``/2`` directory, else the first part's
    footer; inferred for a table another tool wrote, see :mod:`graftlab.trace.foreign`).

    Raises :class:`~graftlab.errors.GraftlabError` when ``path`` is not a readable trace.
    """
    from graftlab.trace import foreign

    if foreign.is_foreign(path):
        return foreign.metadata(path)
    path = Path(path)
    return trace_metadata(path, open_part(trace_files(path)[0]))[1]


def with_ratio(table: pa.Table) -> pa.Table:
    """``table`` with a ``ratio`` column after ``norm_d``: ``norm_m / norm_d`` in float32 (not finite
    where D's step was zero), as the Graft computed it; a ``/2`` part stores the norms only. A table
    that already has ``ratio`` is returned as it is."""
    if "ratio" in table.column_names:
        return table
    ratio = pc.divide(table.column("norm_m"), table.column("norm_d"))
    return table.add_column(table.column_names.index("norm_d") + 1, "ratio", ratio)


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
    table, scan = _table(Path(path), check_steps(steps), check_group_names(groups), columns, list(required))
    return table, scan.meta


def _table(path: Path, steps, groups, columns, required: list[str]) -> tuple[pa.Table, Any]:
    """:func:`read_table`'s table, and the scan it came from."""
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
        check_known(groups, dict.fromkeys(scan.names + dictionary), path)
        codes = pa.array([i for i, g in enumerate(dictionary) if g in keep], pa.int32())
        table = table.filter(pc.is_in(_indices(group), value_set=codes))
    if "ratio" in required:
        table = with_ratio(table)
    order = [c for c in REQUIRED if c in required] + scan.extras
    return table.select(order).replace_schema_metadata(None), scan


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
    the part files and row groups that can hold those steps. ``groups`` (a list of names) and
    ``columns`` (extra columns; the required ones always come) narrow the read the same way.
    A range past the recorded steps gives no rows; an empty or reversed one (``start >= stop``)
    and a group name the trace does not hold are errors (:mod:`graftlab.trace.selection`).

    Raises :class:`~graftlab.errors.GraftlabError` when ``path`` does not exist, holds no part files
    or a stray copy of one, is not readable Parquet (a damaged footer, or a data page whose checksum
    fails), has no graftlab metadata or a format this graftlab does not read, has a part that lacks a
    required column or holds one of the wrong type, holds a step twice, or lacks a column named in
    ``columns``. A table another tool wrote (Parquet without graftlab metadata, or CSV, with columns
    ``step, group`` and ``ratio`` or ``norm_m, norm_d``), or a ``/2`` part file away from its
    ``_graftlab.json`` (or a directory of them), is read by :func:`graftlab.trace.foreign.read`. Recorded
    steps missing between part files (one deleted: :mod:`graftlab.trace.gaps`) inside ``steps``
    give one ``UserWarning`` naming them.
    """
    from graftlab.trace import foreign

    steps, groups = check_steps(steps), check_group_names(groups)
    if foreign.is_foreign(path):
        return foreign.read(path, steps=steps, groups=groups, columns=columns)
    path = Path(path)
    df = None
    if groups is None:
        scan = _scanner(path, steps, columns, list(REQUIRED))
        df = _stream_to_pandas(scan)
    if df is None:  # rows out of order (or a groups filter): read whole, sort, convert
        table, scan = _table(path, steps, groups, columns, list(REQUIRED))
        df = _to_pandas(table)
        del table
    meta = scan.meta
    if scan.gaps:
        warnings.warn(f"{path}: {describe_gaps(scan.gaps)} are missing between the trace's part files "
                      "(a part file is gone?)", stacklevel=2)
    if groups is not None:
        df["group"] = df["group"].cat.remove_unused_categories()
    df.attrs["graftlab"] = frame_metadata(meta)
    return df


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
    a trace of thousands of parts, and no graftlab metadata is needed. Raises
    :class:`~graftlab.errors.GraftlabError` when ``path`` is not a readable trace, lacks a required
    column, or holds no rows. A foreign table (:mod:`graftlab.trace.foreign`) has its ``step`` column read.
    """
    from graftlab.trace import foreign

    if foreign.is_foreign(path):
        return foreign.extent(path)
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

    Returns ``{"metadata", "format", "parts", "rows", "first_step", "last_step", "steps", "gaps",
    "columns", "computed", "bytes"}``; ``steps`` counts recorded steps (rows / groups); ``gaps`` lists
    the ``(first, last)`` recorded steps missing between parts (:mod:`graftlab.trace.gaps`); ``columns`` are those
    :func:`read_trace` returns, ``computed`` those of them not stored (``["ratio"]`` for ``/2``). Every part's footer is checked as
    :func:`read_trace` checks it, so a duplicated or damaged part is an error here too.
    """
    from graftlab.trace import foreign

    if foreign.is_foreign(path):
        return foreign.info(path)
    path = Path(path)
    fmt, meta, parts, missing = open_parts(path, None)
    if not path.is_dir():
        parts[0].bounds = step_bounds(parts[0])
    columns: list[str] = []
    for p in parts:
        for name in p.schema.names:
            if name not in columns:
                columns.append(name)
    computed = []
    if fmt != FORMAT_1 and "ratio" not in columns:
        columns.insert(columns.index("norm_d") + 1, "ratio")  # computed on read
        computed.append("ratio")
    bounds = [p.bounds for p in parts if p.bounds is not None]
    rows = sum(p.rows for p in parts)
    n_groups = len(meta.get("groups") or []) or 1
    return {"metadata": meta, "format": fmt, "parts": len(parts), "rows": rows,
            "first_step": min(b[0] for b in bounds) if bounds else None,
            "last_step": max(b[1] for b in bounds) if bounds else None,
            "steps": rows // n_groups, "gaps": missing, "columns": columns, "computed": computed,
            "bytes": sum(p.path.stat().st_size for p in parts)}
