"""Where a trace's pieces are: format constants, the columns' schema, and file names on disk."""
from __future__ import annotations

import fnmatch
import os
import re
import stat
from pathlib import Path
from typing import Union

import pyarrow as pa
import pyarrow.parquet as pq

from graftlab.errors import GraftlabError
from graftlab.io.fsutil import check_regular, clean_temporaries, temporary_name, temporary_pattern
from graftlab.trace.lock import LOCK_NAME

FORMAT = "graftlab.trace/2"
FORMAT_1 = "graftlab.trace/1"
READABLE_FORMATS = (FORMAT_1, FORMAT)
METADATA_KEY = b"graftlab"
SIDECAR = "_graftlab.json"
PART_GLOB = "part-*.parquet"
# where a recording that replaces or cuts back a trace keeps the old files until its first part
# is durable (graftlab.trace.replacing)
BACKUP = ".graftlab-replaced"
PART_NAME = re.compile(r"part-(\d{12})\.parquet")
REQUIRED = ("step", "group", "norm_m", "norm_d", "ratio")
# What each format stores: /2 leaves ``ratio`` out (read_trace computes it from the norms, exactly).
STORED = {FORMAT_1: REQUIRED, FORMAT: ("step", "group", "norm_m", "norm_d")}
FLOAT_COLUMNS = ("norm_m", "norm_d", "ratio", "norm_g")  # byte-stream-split encoded

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

__all__ = [
    "FLOAT_COLUMNS", "FORMAT", "FORMAT_1", "METADATA_KEY", "PART_GLOB", "PART_NAME", "READABLE_FORMATS", "REQUIRED",
    "SCHEMA", "SIDECAR", "STORED", "PathLike", "is_trace", "part_files", "part_first_step", "part_name",
    "temporary_name", "trace_files",
]


def part_name(first_step: int) -> str:
    """The file name of the part whose first step is ``first_step``: name order is step order."""
    return f"part-{first_step:012d}.parquet"


def part_first_step(path: PathLike) -> int:
    """The first step of a part file, from its name; GraftlabError for a name graftlab does not write."""
    m = PART_NAME.fullmatch(Path(path).name)
    if m is None:
        raise GraftlabError(f"{path}: not a part file name graftlab writes (part-<12 digits>.parquet)")
    return int(m.group(1))


# graftlab's own names in a trace folder: what a temporary may stand for, and what replacing a
# trace may delete (exactly these: a user's ``part-notes.parquet`` or ``part-000000000000 (1).parquet``
# matches the glob readers use, never these)
OWNED_NAMES = r"part-\d{12}\.parquet|" + re.escape(SIDECAR)
_LEGACY_TEMPORARY = re.compile(rf"\.(?:{OWNED_NAMES})\.tmp")  # the fixed names of earlier versions


def trace_owned(name: str) -> bool:
    """Whether a file name in a trace directory belongs to the trace: a part named exactly as
    graftlab names them (:func:`part_name`), the sidecar, the writer's lock, or a temporary of a
    part or the sidecar in graftlab's pattern. Replacing a trace may delete these and nothing else."""
    return (PART_NAME.fullmatch(name) is not None or name in (SIDECAR, LOCK_NAME)
            or temporary_pattern(OWNED_NAMES).fullmatch(name) is not None
            or _LEGACY_TEMPORARY.fullmatch(name) is not None)


def clean_trace_temporaries(directory: PathLike) -> None:
    """Delete the temporaries of parts and the sidecar a killed writer left in the trace
    ``directory`` (graftlab's own patterns only; a live writer's are kept)."""
    clean_temporaries(directory, OWNED_NAMES)
    try:
        names = [n for n in os.listdir(directory) if _LEGACY_TEMPORARY.fullmatch(n)]
    except OSError:
        return
    for n in names:
        p = os.path.join(directory, n)
        if stat.S_ISREG(os.lstat(p).st_mode):  # unlink never follows a link; only files are ours
            os.unlink(p)


def part_files(directory: PathLike) -> list[Path]:
    """The files of a trace directory that look like parts (:data:`PART_GLOB`), in name order.

    The list includes stray names such as a copy ``part-000000000025 (1).parquet`` that
    ``pandas.read_parquet`` would read too; :func:`trace_files` refuses those.
    """
    directory = Path(directory)
    # sorting names, not Path objects: a long run has thousands of parts
    return [directory / n for n in sorted(n for n in os.listdir(directory) if fnmatch.fnmatchcase(n, PART_GLOB))]


def trace_files(path: Path) -> list[Path]:
    """The Parquet files of a trace (the file itself, or a directory's parts in step order).

    Raises :class:`GraftlabError` when there are none, or when a directory holds a file that looks like
    a part but is not named like one (a copy made by a file manager, a renamed part): its rows would be
    read twice, by graftlab and by ``pandas.read_parquet``.
    """
    if not path.exists():
        raise GraftlabError(f"{path}: no such trace")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise GraftlabError(f"{path}: not a trace (neither a file nor a directory)")
    files = part_files(path)
    if not files:
        if (path / BACKUP).is_dir():
            raise GraftlabError(f"{path}: a recording that was replacing this trace stopped before its first part; "
                                f"the old trace waits in {path / BACKUP}: move its files back into {path}, or record into {path} "
                                "again (a recording puts them back first)")
        raise GraftlabError(f"{path}: not a trace (no {PART_GLOB} files; an empty or interrupted recording?)")
    for f in files:  # a FIFO named like a part would be waited on forever
        check_regular(f, "trace part")
    stray = [f.name for f in files if PART_NAME.fullmatch(f.name) is None]
    if stray:
        raise GraftlabError(
            f"{path}: {stray[0]!r} is not a part name graftlab writes (a copy of a part?); move it out of "
            f"the trace so its steps are not read twice" + (f" ({len(stray)} such files)" if len(stray) > 1 else "")
        )
    return files


def is_trace(path: PathLike) -> bool:
    """Whether ``path`` holds a trace: a directory with the sidecar or part files (a recording that
    has not flushed yet has only the sidecar), or a Parquet file with the stored columns of a format."""
    path = Path(path)
    if path.is_dir():
        return (path / SIDECAR).exists() or bool(part_files(path))
    if not path.is_file():
        return False
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError):
        return False
    return any(all(c in names for c in cols) for cols in STORED.values())


class GroupList(list):
    """The metadata's ``groups`` as a DataFrame's ``attrs`` hold them: a list that ``copy.deepcopy``
    shares instead of copying. pandas deep-copies ``attrs`` on nearly every operation (each column
    access), which for 10^5 groups cost a second apiece; the group records are read, not edited."""

    def __deepcopy__(self, memo: dict) -> "GroupList":
        return self


def frame_metadata(meta: dict) -> dict:
    """``meta`` as ``df.attrs["graftlab"]`` holds it: its ``groups`` a :class:`GroupList`."""
    groups = meta.get("groups")
    if isinstance(groups, list) and not isinstance(groups, GroupList):
        meta = {**meta, "groups": GroupList(groups)}
    return meta
