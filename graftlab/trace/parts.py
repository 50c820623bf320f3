"""Opening and checking a trace's Parquet files from their footers, before any data page is read.

Each part's footer is read once (:func:`open_part`) and kept by the scan that reads its rows, so
the checks cost no extra I/O. What is refused here, each with one :class:`GraftlabError` line:

- a footer that is not readable Parquet (truncated, bit-flipped, not UTF-8 names);
- column names that disagree with the Arrow schema stored beside them (a flipped byte in a name);
- a part without a required column, or with one of the wrong type (a string ``step``, an int
  ``group``), where readers would otherwise fill NaN or fail deep inside pandas;
- parts of another format than the trace's;
- steps held twice: a part whose first step is not the one its name gives (a renamed copy) or whose
  steps reach into the next part's.

Data pages are checked when read: the scan verifies their CRC32 checksums
(``page_checksum_verification``), so a flipped bit in the data is an error, not a changed value.
"""
from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from graftlab.io.fsutil import check_regular
from graftlab.errors import GraftlabError
from graftlab.trace.layout import FORMAT, METADATA_KEY, READABLE_FORMATS, SIDECAR, STORED, part_first_step

READ_ERRORS = (pa.ArrowException, OSError, UnicodeDecodeError, ValueError)


def describe(err: BaseException) -> str:
    """An Arrow error's first line, without the C++ source locations Arrow appends."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) < 300 else text[:297] + "..."


@functools.lru_cache(maxsize=None)
def parquet_format() -> Any:
    """How the scans read parts: ``group`` dictionary-encoded from every part (a /1 part has no Arrow
    schema saying so), and every data page's checksum verified as it is read.

    Built on first use: ``pyarrow.dataset`` imports pandas, which footer-only commands never need.
    """
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    fmt = ds.ParquetFileFormat(
        read_options=ds.ParquetReadOptions(dictionary_columns=["group"]),
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True),
    )
    return fmt, pafs.LocalFileSystem()


@dataclass
class Part:
    """One Parquet file of a trace, its footer read and checked."""

    path: Path
    footer: pq.FileMetaData
    schema: pa.Schema
    key: Optional[bytes]  # the raw value under METADATA_KEY, if any
    bounds: Optional[tuple[int, int]] = field(default=None)
    scan: Any = field(default=None, repr=False)  # a dataset fragment holding the footer already read

    @property
    def rows(self) -> int:
        return self.footer.num_rows

    def fragment(self) -> Any:
        """A dataset fragment that scans this part (with checksum verification)."""
        if self.scan is None:
            fmt, fs = parquet_format()
            self.scan = fmt.make_fragment(str(self.path.absolute()), fs)
        return self.scan


# ``"format": "graftlab.corrections/<n>"`` among the first bytes: graftlab writes the key first
_CORRECTIONS_SNIFF = 4096


def _is_corrections_file(path: Path) -> bool:
    """Whether ``path`` is a JSON corrections file (what ``graftlab distill`` writes), given where a
    trace was expected: a few KiB are read, and only after the file failed to open as Parquet."""
    import re

    try:
        with open(path, "rb") as f:
            head = f.read(_CORRECTIONS_SNIFF)
    except OSError:
        return False
    return (head.lstrip()[:1] == b"{"
            and re.search(rb'"format"\s*:\s*"graftlab\.corrections/', head) is not None)


def open_part(path: Path, scan: bool = False) -> Part:
    """Read ``path``'s footer; GraftlabError if it is not readable Parquet or its schema is damaged.

    ``scan``: read it through a dataset fragment, which the scan of the rows then reuses (the footer
    is read once); without, only ``pyarrow.parquet`` is needed.
    """
    fragment = None
    try:
        if scan:
            fmt, fs = parquet_format()
            fragment = fmt.make_fragment(str(Path(path).absolute()), fs)
            footer = fragment.metadata
        else:
            footer = pq.read_metadata(path)
        schema = footer.schema.to_arrow_schema()
        names = list(schema.names)
        kv = dict(footer.metadata or {})
        parquet_names = list(footer.schema.names)
    except READ_ERRORS as err:
        if _is_corrections_file(Path(path)):
            raise GraftlabError(
                f"{path}: a graftlab corrections file, not a trace: see it with `graftlab show {path}`, train with "
                f"it with `graftlab train --corrections {path}` (Python: graftlab.load_corrections)") from None
        raise GraftlabError(f"{path}: not a readable Parquet file ({describe(err)})") from None
    stored = kv.get(b"ARROW:schema")
    if stored is not None:  # the same names twice: a flipped byte in one copy shows
        try:
            arrow_names = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(stored))).names
        except READ_ERRORS as err:
            raise GraftlabError(f"{path}: damaged Parquet footer (stored Arrow schema: {describe(err)})") from None
        if list(arrow_names) != parquet_names:
            raise GraftlabError(f"{path}: damaged Parquet footer (column names {parquet_names} disagree with the "
                                f"stored schema's {list(arrow_names)})")
    if len(set(names)) != len(names):
        raise GraftlabError(f"{path}: damaged Parquet footer (a column name appears twice: {names})")
    return Part(Path(path), footer, schema, kv.get(METADATA_KEY), scan=fragment)


def decode(raw: Optional[bytes], where: Path) -> dict[str, Any]:
    """A graftlab metadata value (a full run metadata, or a /2 part's marker) as a dict."""
    if not raw:
        raise GraftlabError(f"{where}: not a graftlab trace (no graftlab metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise GraftlabError(f"{where}: graftlab metadata is not valid JSON") from None
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("graftlab.trace/"):
        raise GraftlabError(f"{where}: unknown trace format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta["format"] not in READABLE_FORMATS:
        raise GraftlabError(f"{where}: trace format {meta['format']} is not one this graftlab reads "
                            f"({', '.join(READABLE_FORMATS)}; a newer graftlab wrote it?)")
    groups = meta.get("groups")
    if groups is not None and not (isinstance(groups, list)
                                   and all(isinstance(g, dict) and isinstance(g.get("name"), str) for g in groups)):
        raise GraftlabError(f"{where}: graftlab metadata 'groups' must be a list of objects with a 'name'")
    if groups:
        names = [g["name"] for g in groups]
        if "" in names:
            raise GraftlabError(f"{where}: graftlab metadata names a group '' (a group needs a name)")
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise GraftlabError(f"{where}: graftlab metadata names the group {twice!r} twice")
    for key in ("every", "flush_every"):
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise GraftlabError(f"{where}: graftlab metadata {key!r} must be a whole number >= 1, got {value!r}")
    start = meta.get("start_step")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
        raise GraftlabError(f"{where}: graftlab metadata 'start_step' must be a whole number >= 0, got {start!r}")
    return meta


def is_marker(meta: dict[str, Any]) -> bool:
    """Whether a part's metadata is a /2 marker (the run metadata is in the sidecar)."""
    return meta.get("format") == FORMAT and meta.get("metadata") == SIDECAR and "groups" not in meta


def read_sidecar(directory: Path, where: Optional[Path] = None) -> dict[str, Any]:
    """The run metadata in ``directory``'s sidecar; errors name ``where`` (default: ``directory``)."""
    path = directory / SIDECAR
    check_regular(path, "trace sidecar")  # a FIFO would be waited on forever
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if where is not None and where != directory:  # a part file read on its own
            raise GraftlabError(f"{where}: a {FORMAT} part keeps its run metadata in the {SIDECAR} beside it, "
                                f"which is missing") from None
        raise GraftlabError(f"{directory}: a {FORMAT} trace keeps its metadata in {SIDECAR}, which is missing") from None
    except OSError as err:
        raise GraftlabError(f"{path}: cannot read ({err.strerror})") from None
    meta = decode(raw, path)
    if meta["format"] != FORMAT or is_marker(meta):
        raise GraftlabError(f"{path}: expected the {FORMAT} run metadata, found format {meta['format']}")
    return meta


def trace_metadata(path: Path, first: Part) -> tuple[str, dict[str, Any]]:
    """``(format, run metadata)`` of the trace at ``path`` whose first Parquet file is ``first``.

    A ``/1`` part holds the metadata itself; a ``/2`` part holds a marker and the directory's sidecar
    holds the metadata (a single-file ``/2`` trace holds it in its footer).
    """
    meta = decode(first.key, first.path)
    if is_marker(meta):  # a part read on its own finds the metadata beside it
        return FORMAT, read_sidecar(path.parent, path) if path.is_file() else read_sidecar(path)
    return meta["format"], meta


def _type_ok(column: str, t: pa.DataType) -> bool:
    if column == "step":
        return pa.types.is_integer(t)
    if column == "group":
        if pa.types.is_dictionary(t):
            t = t.value_type
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    return pa.types.is_floating(t)


def check_part(part: Part, fmt: str, first_key: Optional[bytes]) -> None:
    """The part is of the trace's format and holds that format's columns with their types."""
    if part.key != first_key:  # equal bytes (the common case) need no parsing
        meta = decode(part.key, part.path)
        if meta["format"] != fmt:
            raise GraftlabError(f"{part.path}: a {meta['format']} part in a {fmt} trace")
    names = part.schema.names
    missing = [c for c in STORED[fmt] if c not in names]
    if missing:
        raise GraftlabError(f"{part.path}: lacks required column(s) {', '.join(missing)}")
    for c in STORED[fmt]:
        t = part.schema.field(c).type
        if not _type_ok(c, t):
            want = {"step": "an integer", "group": "a string"}.get(c, "a float")
            raise GraftlabError(f"{part.path}: column {c} is {t}, not {want} column")


def step_bounds(part: Part) -> Optional[tuple[int, int]]:
    """``(min, max)`` of a part's ``step`` column from its row-group statistics (the column itself
    is read only where a writer left them out); None for a part without rows or ``step``."""
    md = part.footer
    names = list(md.schema.names)
    if "step" not in names or md.num_rows == 0:
        return None
    col = names.index("step")
    lo, hi = [], []
    for rg in range(md.num_row_groups):
        r = md.row_group(rg)
        if r.num_rows == 0:
            continue
        st = r.column(col).statistics
        if st is None or not st.has_min_max or not isinstance(st.min, int):
            try:
                steps = pq.read_table(part.path, columns=["step"], page_checksum_verification=True).column("step")
                steps = steps.drop_null().to_numpy()
            except READ_ERRORS as err:
                raise GraftlabError(f"{part.path}: not a readable trace part ({describe(err)})") from None
            return (int(steps.min()), int(steps.max())) if steps.size else None
        lo.append(st.min)
        hi.append(st.max)
    return (int(min(lo)), int(max(hi))) if lo else None


def check_sequence(parts: Iterable[Part]) -> None:
    """Parts of a directory hold disjoint step ranges, each starting at the step its name gives."""
    prev: Optional[Part] = None
    for part in parts:
        part.bounds = step_bounds(part)
        if part.bounds is None:
            continue
        lo, hi = part.bounds
        named = part_first_step(part.path)
        if lo < named:
            raise GraftlabError(f"{part.path}: named for step {named} but holds step {lo} "
                                "(a renamed or copied part?)")
        if prev is not None and prev.bounds is not None and lo <= prev.bounds[1]:
            raise GraftlabError(f"{part.path}: steps {lo}..{min(hi, prev.bounds[1])} are also in {prev.path.name} "
                                "(a duplicated part?)")
        prev = part
