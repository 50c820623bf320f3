"""Writing a trace: tables in the contract's schema, part files and the sidecar, each written under
a temporary name and renamed durably; preparing a directory to record into, and truncating it to resume."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from graftlab.errors import GraftlabError, OutputExistsError
from graftlab.io.fsutil import atomic_path, atomic_write, fsync_directory
from graftlab.trace.lock import LOCK_NAME
from graftlab.trace.layout import (
    FLOAT_COLUMNS, FORMAT, FORMAT_1, METADATA_KEY, PART_NAME, READABLE_FORMATS, SCHEMA, SIDECAR, PathLike,
    clean_trace_temporaries, is_trace, part_files, part_first_step, part_name,
)
from graftlab.trace import replacing

# Per-row cost matters (one row per step and group): floats are byte-stream-split before zstd (their
# exponent bytes then compress well; the low mantissa bits are noise and stay ~3 bytes a value),
# step and group repeat in runs and go through dictionary + RLE. Higher zstd levels gain 1-2% on
# recorded traces at 2-5x the write time (bench/RESULTS.md).
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3
FLOAT_ENCODING = "BYTE_STREAM_SPLIT"


def metadata_bytes(meta: dict[str, Any]) -> bytes:
    """The metadata as stored under :data:`METADATA_KEY` (and in the sidecar)."""
    return json.dumps(meta, default=str).encode()


def part_marker(fmt: str = FORMAT) -> bytes:
    """What a ``/2`` part holds under :data:`METADATA_KEY`: its format, and where the metadata is."""
    return json.dumps({"format": fmt, "metadata": SIDECAR}).encode()


def _format_of(meta: Optional[dict[str, Any]]) -> str:
    fmt = (meta or {}).get("format", FORMAT)
    if fmt not in READABLE_FORMATS:
        raise GraftlabError(f"cannot write trace format {fmt!r} (this graftlab writes {', '.join(READABLE_FORMATS)})")
    return fmt


def build_table(
    steps: "Any",
    group_names: Iterable[str],
    stats: "Any",
    scalars: Optional[dict[str, "Any"]] = None,
    meta: Optional[dict[str, Any]] = None,
    group_columns: Optional[dict[str, "Any"]] = None,
) -> pa.Table:
    """A trace table from ``steps`` (n,), ``stats`` (n, 3, G) ``[norm_m, norm_d, ratio]`` per step and
    group, and per-step ``scalars`` (name -> (n,) floats, repeated on every group row of the step) and
    optional per-group float32 columns ``group_columns`` (name -> (n, G), e.g. ``norm_g``).

    The layout follows ``meta["format"]`` (default :data:`FORMAT`), so a resumed ``/1`` trace stays
    ``/1``: ``graftlab.trace/2`` stores the norms as float32 and no ``ratio`` column (readers compute
    ``norm_m / norm_d`` in float32: bit-identical to the ratio a float32 :class:`~graftlab.Graft`
    records); ``graftlab.trace/1`` stores ``stats[:, 2]`` as ``ratio`` too. ``meta`` goes into the
    table's schema metadata in full (:func:`write_part` keeps only a marker in each part).
    """
    fmt = _format_of(meta)
    names = list(group_names)
    steps = np.asarray(steps, dtype=np.int64)
    stats = np.asarray(stats, dtype=np.float32)
    n, g = len(steps), len(names)
    if stats.shape != (n, 3, g):
        raise GraftlabError(f"stats must have shape ({n}, 3, {g}), got {stats.shape}")
    indices = pa.array(np.tile(np.arange(g, dtype=np.int32), n))
    columns = {
        "step": pa.array(np.repeat(steps, g)),
        "group": pa.DictionaryArray.from_arrays(indices, pa.array(names, type=pa.string())),
        "norm_m": pa.array(stats[:, 0, :].reshape(-1)),
        "norm_d": pa.array(stats[:, 1, :].reshape(-1)),
        "ratio": pa.array(stats[:, 2, :].reshape(-1)),
    }
    fields = list(SCHEMA)
    if fmt != FORMAT_1:
        del columns["ratio"]
        fields = [f for f in fields if f.name != "ratio"]
    for key, values in (group_columns or {}).items():
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (n, g):
            raise GraftlabError(f"group column {key!r} must have shape ({n}, {g}), got {values.shape}")
        columns[key] = pa.array(values.reshape(-1))
        fields.append(pa.field(key, pa.float32()))
    for key, values in (scalars or {}).items():
        if key in columns or key == "ratio":
            raise GraftlabError(f"scalar column {key!r} clashes with a trace column")
        values = np.asarray(values)
        kind = pa.float64() if values.dtype == np.float64 else pa.float32()
        columns[key] = pa.array(np.repeat(values.astype(kind.to_pandas_dtype()), g))
        fields.append(pa.field(key, kind))
    schema = pa.schema(fields, metadata={METADATA_KEY: metadata_bytes(meta)} if meta is not None else None)
    return pa.table(list(columns.values()), schema=schema)


def _table_format(table: pa.Table) -> str:
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return FORMAT_1 if "ratio" in table.column_names else FORMAT
    try:
        return _format_of(json.loads(raw))
    except ValueError:
        raise GraftlabError("the table's graftlab metadata is not valid JSON") from None


def write_table(table: pa.Table, path: PathLike) -> None:
    """Write ``table`` to ``path`` atomically and durably: under a hidden name, fsynced, renamed.

    Data pages carry CRC32 checksums (``write_page_checksum``), which the readers verify.
    """
    fmt = _table_format(table)
    floats = [f.name for f in table.schema if f.name in FLOAT_COLUMNS]
    others = [f.name for f in table.schema if f.name not in floats]
    meta = (table.schema.metadata or {}).get(METADATA_KEY)
    with atomic_path(path) as tmp:
        # /1 kept the Arrow schema out of the footer (it would hold the full metadata a second time);
        # /2 stores it (a marker only): readers then get ``group`` back as a dictionary (categorical).
        with pq.ParquetWriter(
            tmp,
            table.schema,
            compression=COMPRESSION,
            compression_level=COMPRESSION_LEVEL,
            use_dictionary=others,
            column_encoding={c: FLOAT_ENCODING for c in floats},
            write_statistics=True,
            store_schema=fmt != FORMAT_1,
            write_page_checksum=True,
        ) as writer:
            writer.write_table(table)
            if meta is not None and fmt == FORMAT_1:
                writer.add_key_value_metadata({METADATA_KEY: meta})


def write_part(directory: PathLike, table: pa.Table) -> Path:
    """Write one part file of a trace directory; its name comes from its first step.

    A ``/2`` part keeps only :func:`part_marker` as its metadata: the run metadata is stored once, in
    the directory's sidecar (:func:`write_sidecar`, written before the first part).
    """
    first = int(table.column("step")[0].as_py())
    path = Path(directory) / part_name(first)
    if _table_format(table) != FORMAT_1:
        table = table.replace_schema_metadata({METADATA_KEY: part_marker()})
    write_table(table, path)
    return path


def write_sidecar(directory: PathLike, meta: dict[str, Any]) -> Path:
    """Write ``_graftlab.json`` (atomically and durably) into a trace directory.

    For a ``graftlab.trace/2`` directory this is the only copy of the run metadata.
    """
    return atomic_write(Path(directory) / SIDECAR, json.dumps(meta, indent=1, default=str))


def prepare_directory(path: PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Make ``path`` a trace directory to record into: created, emptied of a trace (``overwrite``)
    or kept as it is (``resume``).

    An existing non-empty directory is an :class:`~graftlab.errors.OutputExistsError` unless
    ``overwrite`` or ``resume``, and even then only a trace is used: a directory holding no trace is
    a :class:`GraftlabError`. Replacing a trace moves only its own files (parts named as graftlab
    names them, the sidecar; :func:`~graftlab.trace.layout.trace_owned`) aside into the backup
    folder (:mod:`graftlab.trace.replacing`: restored if the new run fails before its first part),
    never a file a user keeps beside them, and an existing file is never turned into a directory.
    Call it holding the trace's lock.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GraftlabError(f"{path} exists and is a file, not a trace folder; choose another path")
    if path.exists():
        entries = [p for p in path.iterdir() if p.name not in (LOCK_NAME, replacing.BACKUP)]
        if entries and not resume:
            if not overwrite:
                raise OutputExistsError(path, "trace")
            if not is_trace(path):
                raise GraftlabError(f"{path} is a directory that does not hold a graftlab trace; not replacing it")
            clean_trace_temporaries(path)
            replacing.begin(path)
            for p in entries:
                if replacing._restorable(p.name) and replacing._is_file(p):
                    replacing.stash(path, p.name)
        elif resume and entries and not is_trace(path):
            raise GraftlabError(f"{path} does not hold a graftlab trace to resume")
    path.mkdir(parents=True, exist_ok=True)
    fsync_directory(path.parent if str(path.parent) else Path("."))
    return path


def truncate(path: PathLike, start_step: int) -> None:
    """Drop the rows with ``step >= start_step`` from a trace directory (a resumed run redoes those
    steps), and the temporary files of parts that a killed writer left half-written. The parts
    removed or rewritten are kept aside until the run's first new part (:mod:`graftlab.trace.replacing`)."""
    path = Path(path)
    clean_trace_temporaries(path)
    for part in part_files(path):
        if PART_NAME.fullmatch(part.name) is None:
            continue  # not a name graftlab writes: a user's file, never touched
        if part_first_step(part) >= start_step:
            replacing.begin(path)
            replacing.stash(path, part.name)
            continue
        try:
            table = pq.read_table(part, page_checksum_verification=True)
        except (pa.ArrowException, OSError) as err:
            raise GraftlabError(f"{part}: not a readable Parquet file ({err}); cannot resume into this trace") from None
        steps = table.column("step").to_numpy()
        if steps.size and steps.max() >= start_step:
            replacing.begin(path)
            replacing.stash(path, part.name)
            write_table(table.filter(pc.less(table.column("step"), start_step)), part)
    fsync_directory(path)


# -- one schema for every part --------------------------------------------------------------------
# pandas, pyarrow.dataset and DuckDB take a folder's schema from one part and drop columns the
# others add; polars refuses parts that differ. So every part of a trace holds every column of the
# trace, in one order: a column first logged after earlier parts were written widens them with nulls.
def part_fields(directory: PathLike) -> dict[str, pa.Field]:
    """The union of the columns of the parts in ``directory``, in order of first appearance."""
    fields: dict[str, pa.Field] = {}
    for part in part_files(directory):
        try:
            schema = pq.read_schema(part)
        except (pa.ArrowException, OSError):
            continue  # the reader reports a broken part; widening skips it
        for f in schema:
            fields.setdefault(f.name, f)
    return fields


def conform(table: pa.Table, fields: dict[str, pa.Field]) -> pa.Table:
    """``table`` with the columns of ``fields`` in their order, those it lacks as nulls, and its
    own other columns after them; its schema metadata kept."""
    names = [*fields, *(n for n in table.column_names if n not in fields)]
    if names == table.column_names:
        return table
    own = set(table.column_names)
    schema = pa.schema([table.schema.field(n) if n in own else fields[n] for n in names], metadata=table.schema.metadata)
    columns = [table.column(n) if n in own else pa.nulls(table.num_rows, fields[n].type) for n in names]
    return pa.Table.from_arrays(columns, schema=schema)


def widen_parts(directory: PathLike, fields: dict[str, pa.Field]) -> None:
    """Rewrite (atomically, each under a temporary name) the parts of ``directory`` that lack some of
    ``fields``, adding those columns as nulls. Each part is complete at every moment."""
    for part in part_files(directory):
        try:
            if set(pq.read_schema(part).names) >= set(fields):
                continue
            table = pq.read_table(part, page_checksum_verification=True)
        except (pa.ArrowException, OSError):
            continue
        write_table(conform(table, fields), part)
