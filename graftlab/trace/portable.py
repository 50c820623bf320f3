"""Run metadata without the recording machine's absolute paths.

A trace travels (the sample traces ship in the repository), so its metadata says where things were
in terms that hold on any machine: a path inside an installed package as
``site-packages/<package path>`` (the package's version is in ``versions`` or the data set's
name), any other path relative to the trace directory. :class:`graftlab.Recorder` applies
:func:`portable_paths` to the metadata it writes.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

_PACKAGES = re.compile(r"[\\/](?:site|dist)-packages[\\/]")


def is_absolute_path(value: Any) -> bool:
    """Whether ``value`` is a string that reads as an absolute file path (POSIX or Windows)."""
    if not isinstance(value, str) or not value or "\n" in value:
        return False
    if PureWindowsPath(value).drive and PureWindowsPath(value).is_absolute():
        return True
    return PurePosixPath(value).is_absolute() and len(value) > 1


def portable_path(value: str, base: Path) -> str:
    """``value`` (an absolute path) as ``site-packages/...`` when inside an installed package, else
    relative to the folder ``base`` (POSIX separators); unchanged when it is not an absolute path."""
    if not is_absolute_path(value):
        return value
    inside = _PACKAGES.split(value, maxsplit=1)
    if len(inside) == 2:
        return "site-packages/" + inside[1].replace("\\", "/")
    windows = bool(PureWindowsPath(value).drive)
    if windows != (os.name == "nt"):  # a path of another system: only its name means anything here
        return (PureWindowsPath(value) if windows else PurePosixPath(value)).name or value
    try:
        rel = os.path.relpath(value, Path(base).expanduser().resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        return PureWindowsPath(value).name or value
    return Path(rel).as_posix()


def portable_paths(value: Any, base: Path) -> Any:
    """A copy of ``value`` (JSON-like: dicts, lists, strings, numbers) with every absolute path
    string rewritten by :func:`portable_path` relative to the trace directory ``base``."""
    if isinstance(value, dict):
        return {k: portable_paths(v, base) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v, base) for v in value]
    return portable_path(value, base) if isinstance(value, str) else value


def rewrite_trace(trace_dir: os.PathLike | str, recorded_at: os.PathLike | str | None = None) -> list[Path]:
    """Rewrite the metadata of an existing trace directory (``_graftlab.json`` and every part
    file's footer) with :func:`portable_paths`; the data rows are read and written back unchanged.

    ``recorded_at`` is where the trace directory was when it was recorded (relative paths are taken
    from there; default: where it is now). Each file is replaced atomically. Returns the files
    rewritten.
    """
    import json

    import pyarrow.parquet as pq

    from graftlab import trace

    trace_dir = Path(trace_dir)
    base = Path(recorded_at) if recorded_at is not None else trace_dir
    done = []
    for part in trace.part_files(trace_dir):
        table = pq.read_table(part)
        raw = (table.schema.metadata or {}).get(trace.METADATA_KEY)
        if raw is None:
            continue
        meta = portable_paths(json.loads(raw), base)
        table = table.replace_schema_metadata({**table.schema.metadata, trace.METADATA_KEY: trace.metadata_bytes(meta)})
        trace.write_table(table, part)
        done.append(part)
    sidecar = trace_dir / trace.SIDECAR
    if sidecar.exists():
        trace.write_sidecar(trace_dir, portable_paths(json.loads(sidecar.read_text()), base))
        done.append(sidecar)
    return done
