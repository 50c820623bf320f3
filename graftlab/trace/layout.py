"""Where a trace's pieces are: format constants, the columns' schema, and file names on disk."""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Union

import pyarrow as pa
import pyarrow.parquet as pq

from graftlab.errors import GraftlabError
from graftlab.tracelock import LOCK_NAME

FORMAT = "graftlab.trace/1"
METADATA_KEY = b"graftlab"
SIDECAR = "_graftlab.json"
PART_GLOB = "part-*.parquet"
REQUIRED = ("step", "group", "norm_m", "norm_d", "ratio")

SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("group", pa.dictionary(pa.int32(), pa.string())),
        ("norm_m", pa.float32()),
        ("norm_d", pa.float32()),
        ("ratio", pa.float32()),
    ]
)

PathLike = Union[str, os.PathLike]


def part_name(first_step: int) -> str:
    """The file name of the part whose first step is ``first_step``: name order is step order."""
    return f"part-{first_step:012d}.parquet"


def part_first_step(path: PathLike) -> int:
    """The first step of a part file, from its name."""
    return int(Path(path).stem.split("-")[1])


def temporary_name(path: PathLike) -> Path:
    """The hidden name a trace file is written under before it is renamed to ``path``.

    Hidden (a leading dot) so that neither ``pandas.read_parquet`` nor :data:`PART_GLOB` sees a
    half-written part.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def trace_owned(name: str) -> bool:
    """Whether a file name in a trace directory belongs to the trace (a part, the sidecar, their
    hidden temporaries, the writer's lock): what replacing a trace may delete, and nothing else."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:-4]
    return fnmatch.fnmatchcase(name, PART_GLOB) or name in (SIDECAR, LOCK_NAME)


def part_files(directory: PathLike) -> list[Path]:
    """The part files of a trace directory, in step order."""
    directory = Path(directory)
    # sorting names, not Path objects: a long run has thousands of parts
    return [directory / n for n in sorted(n for n in os.listdir(directory) if fnmatch.fnmatchcase(n, PART_GLOB))]


def trace_files(path: Path) -> list[Path]:
    """The Parquet files of a trace (the file itself, or a directory's parts); GraftlabError if none."""
    if not path.exists():
        raise GraftlabError(f"{path}: no such trace")
    if path.is_file():
        return [path]
    files = part_files(path)
    if not files:
        raise GraftlabError(f"{path}: not a trace (no {PART_GLOB} files; an empty or interrupted recording?)")
    return files


def is_trace(path: PathLike) -> bool:
    """Whether ``path`` holds a trace: a directory with the sidecar or part files (a recording that
    has not flushed yet has only the sidecar), or a Parquet file with the required columns."""
    path = Path(path)
    if path.is_dir():
        return (path / SIDECAR).exists() or bool(part_files(path))
    if not path.is_file():
        return False
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError):
        return False
    return all(c in names for c in REQUIRED)
