"""The trace contract: one definition of the Parquet trace that ``record`` writes and ``distill`` reads.

A trace is a directory of Parquet part files (or a single Parquet file), one row per recorded
(step, group). :func:`read_trace` returns these columns; ``pandas.read_parquet``, ``polars`` and
``duckdb`` read the same rows straight from the files (the ``/2`` files hold no ``ratio`` column:
compute it as ``norm_m / norm_d`` in float32):

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
taken; :mod:`graftlab.distill.degenerate` reads it to tell float-noise groups apart. A table without
graftlab metadata (Parquet from another tool, or CSV) is read too, with the metadata inferred
(:mod:`graftlab.trace.foreign`), when it has ``step, group`` and ``ratio``, or ``step, group, norm_m,
norm_d`` (a ``/2`` trace exported by pandas, polars or DuckDB): ``ratio`` is then computed as
``norm_m / norm_d``, in float32 when both norms are float32, as for a ``/2`` trace.

Part files are named ``part-<first step, 12 digits>.parquet`` so that name order is step order, and
each is written under a hidden temporary name (:func:`temporary_name`), fsynced and renamed when
complete (:mod:`graftlab.io.fsutil`), so a reader never sees a half-written part and a crash loses no
renamed one. Data pages carry CRC32 checksums that every read verifies. The run metadata is a JSON
object; metadata keys (all present; unknown values are null)::

    format        "graftlab.trace/2" (or "graftlab.trace/1")
    granularity   "global" | "layer" | "coordinate" | "custom"
    groups        [{"name", "kind", "ffn", "block", "shape", "numel", "members"}, ...]
    magnitude     {"class": "Adam", "hyperparameters": {...}}
    direction     {"class": "SGD", "hyperparameters": {...}}
    task, batch_size, seed, device, every, versions {"graftlab", "torch"}, config {...}

Formats (both are read; a trace keeps the format it was started in, so a resumed ``/1`` stays ``/1``):

- ``graftlab.trace/2`` (written now): the directory's ``_graftlab.json`` (written durably before the
  first part) is the one copy of the metadata; each part's Parquet key-value metadata ``graftlab``
  holds only ``{"format": "graftlab.trace/2", "metadata": "_graftlab.json"}``. ``ratio`` is not
  stored: the norms are, losslessly, and readers compute ``norm_m / norm_d`` in float32, which is
  bit-identical to the ratio a float32 Graft computes. A single-file ``/2`` trace
  (:func:`write_table`) holds the metadata in its footer; a part file copied out of its directory
  holds only the marker, so it (or a directory of such parts without the sidecar) is read as a table
  without metadata (:mod:`graftlab.trace.foreign`). About 7 bytes per row (bench/RESULTS.md).
- ``graftlab.trace/1``: every part stores ``ratio`` and repeats the full metadata in its footer
  (and the sidecar holds a copy); about 12 bytes per row.

The package holds the contract's parts: :mod:`~graftlab.trace.layout` (constants, schema, file
names, :func:`is_trace`), :mod:`~graftlab.trace.parts` (footer checks), :mod:`~graftlab.trace.reading`
(:func:`read_trace`, :func:`read_table`, :func:`read_metadata`, :func:`trace_extent`,
:func:`trace_info`) and :mod:`~graftlab.trace.writing` (:func:`build_table`, :func:`write_part`,
:func:`write_sidecar`, :func:`prepare_directory`, :func:`truncate`); everything is importable from
``graftlab.trace``.
"""
from __future__ import annotations

from graftlab.trace.layout import (
    FORMAT,
    FORMAT_1,
    METADATA_KEY,
    PART_GLOB,
    READABLE_FORMATS,
    REQUIRED,
    SCHEMA,
    SIDECAR,
    STORED,
    PathLike,
    clean_trace_temporaries,
    is_trace,
    part_files,
    part_first_step,
    part_name,
    temporary_name,
    trace_files,
)
from graftlab.trace.reading import (
    group_table, read_metadata, read_table, read_trace, trace_extent, trace_info, with_ratio,
)
from graftlab.trace.writing import (
    COMPRESSION,
    COMPRESSION_LEVEL,
    FLOAT_ENCODING,
    build_table,
    conform,
    metadata_bytes,
    part_fields,
    part_marker,
    prepare_directory,
    truncate,
    write_part,
    write_sidecar,
    write_table,
    widen_parts,
)

__all__ = [
    "COMPRESSION", "COMPRESSION_LEVEL", "FLOAT_ENCODING", "FORMAT", "FORMAT_1", "METADATA_KEY", "PART_GLOB",
    "READABLE_FORMATS", "REQUIRED", "SCHEMA", "SIDECAR", "STORED", "PathLike", "build_table", "clean_trace_temporaries",
    "conform", "group_table", "is_trace",
    "metadata_bytes", "part_fields", "part_files", "part_first_step", "part_marker", "part_name", "prepare_directory",
    "read_metadata", "read_table", "read_trace", "temporary_name", "trace_extent", "trace_files", "trace_info",
    "with_ratio",
    "truncate", "write_part", "write_sidecar", "write_table", "widen_parts",
]
