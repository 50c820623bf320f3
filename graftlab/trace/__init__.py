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
taken; :mod:`graftlab.degenerate` reads it to tell float-noise groups apart. A table of ``step,
group, ratio`` without graftlab metadata (Parquet from another tool, or CSV) is read too, with the
metadata inferred (:mod:`graftlab.foreign`).

Part files are named ``part-<first step, 12 digits>.parquet`` so that name order is step order, and
each is written under a hidden temporary name (:func:`temporary_name`) and renamed when complete, so
a reader never sees a half-written part. Every part carries the run metadata (a JSON object under the
Parquet schema metadata key ``graftlab``), and the directory holds the same object in
``_graftlab.json``, written before the first part. Metadata keys (all present; unknown values are null)::

    format        "graftlab.trace/1"
    granularity   "global" | "layer" | "coordinate" | "custom"
    groups        [{"name", "kind", "ffn", "block", "shape", "numel", "members"}, ...]
    magnitude     {"class": "Adam", "hyperparameters": {...}}
    direction     {"class": "SGD", "hyperparameters": {...}}
    task, batch_size, seed, device, every, versions {"graftlab", "torch"}, config {...}

The package holds the contract's three parts: :mod:`~graftlab.trace.layout` (constants, schema, file
names, :func:`is_trace`), :mod:`~graftlab.trace.reading` (:func:`read_trace`, :func:`read_metadata`,
:func:`trace_extent`, :func:`trace_info`) and :mod:`~graftlab.trace.writing` (:func:`build_table`,
:func:`write_part`, :func:`write_sidecar`, :func:`prepare_directory`, :func:`truncate`); everything
is importable from ``graftlab.trace``.
"""
from __future__ import annotations

from graftlab.trace.layout import (
    FORMAT,
    METADATA_KEY,
    PART_GLOB,
    REQUIRED,
    SCHEMA,
    SIDECAR,
    PathLike,
    is_trace,
    part_files,
    part_first_step,
    part_name,
    temporary_name,
    trace_files,
)
from graftlab.trace.reading import group_table, read_metadata, read_trace, trace_extent, trace_info
from graftlab.trace.writing import (
    COMPRESSION,
    COMPRESSION_LEVEL,
    FLOAT_ENCODING,
    build_table,
    metadata_bytes,
    prepare_directory,
    truncate,
    write_part,
    write_sidecar,
    write_table,
)

__all__ = [
    "COMPRESSION", "COMPRESSION_LEVEL", "FLOAT_ENCODING", "FORMAT", "METADATA_KEY", "PART_GLOB", "REQUIRED",
    "SCHEMA", "SIDECAR", "PathLike", "build_table", "group_table", "is_trace", "metadata_bytes", "part_files",
    "part_first_step", "part_name", "prepare_directory", "read_metadata", "read_trace", "temporary_name",
    "trace_extent", "trace_files", "trace_info", "truncate", "write_part", "write_sidecar", "write_table",
]
