"""Where a command may write, checked before anything is written, and files replaced only whole.

Every command checks all its output paths first (:func:`check_output`), so a mistake costs nothing:

- a file standing where a parent folder goes (``-o notes.txt/x``) is an error, found before any work;
- an output file that is also an input (``distill T.parquet -o T.parquet``) is an error, as is one
  inside an input folder;
- nothing but trace parts goes into a trace folder (``distill -o T/c.json``, ``--metrics
  T/m.parquet``): ``pandas.read_parquet(T)`` would choke on it, or read it as rows;
- an existing output is an :class:`~graftlab.errors.OutputExistsError` unless ``overwrite``.

The check belongs to the trace contract because its main rule is about trace folders; the writes
themselves are :mod:`graftlab.io.outputs`'.
"""
from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path
from typing import Iterable, Optional, Union

from graftlab.errors import GraftlabError, OutputExistsError, placeholders
from graftlab.io.fsutil import describe_os_error, file_kind
from graftlab.trace.layout import PART_GLOB, PART_NAME, SIDECAR, is_trace, part_files

PathLike = Union[str, os.PathLike]


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (by resolved path)."""
    p, f = path.resolve(), folder.resolve()
    return p == f or f in p.parents


def _is_trace_file(path: Path) -> bool:
    try:
        return is_trace(path)
    except (OSError, ValueError):
        return False


def trace_folder_of(path: PathLike) -> Optional[Path]:
    """The trace directory ``path`` is, or lies inside (its nearest existing folders), or None.

    A trace directory here is one graftlab wrote: it holds the sidecar or a Parquet part under a
    name graftlab gives (:data:`~graftlab.trace.layout.PART_NAME`). A user's folder that only holds a
    copied part (``part-000000000000 (1).parquet``) among their own files is not one: outputs may go
    inside it."""
    p = Path(path).expanduser()
    for folder in (p, *p.parents):
        if folder.is_dir():
            try:
                if is_trace(folder) and _written_by_graftlab(folder):
                    return folder
            except OSError:
                return None
    return None


def _written_by_graftlab(folder: Path) -> bool:
    return (folder / SIDECAR).exists() or any(PART_NAME.fullmatch(p.name) and _parquet(p) for p in part_files(folder))


def _error(what: str, message: str) -> GraftlabError:
    """An error about output ``what``: a parameter placeholder (``"{out}"``) makes it the error's
    parameter, said as its flag on the command line."""
    return GraftlabError(message, param=placeholders(what))


def check_stray_parts(path: PathLike, what: Optional[str] = None) -> None:
    """GraftlabError if the trace folder ``path``, which a recording is about to replace or extend,
    holds an entry named like a part (:data:`~graftlab.trace.layout.PART_GLOB`) that graftlab did
    not write: a copy (``part-000000000000 (1).parquet``), a renamed file, a folder or a link.
    Replacing a trace moves only its own files, so such an entry would stay, and every reader
    (graftlab, ``pandas.read_parquet``) would meet it beside the new parts; it is the user's, so it
    is never moved nor deleted: the recording stops before it starts. ``what`` names ``path`` in
    the message (``"{out}"``: the parameter that gave it)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return
    stray = []
    for name in sorted(os.listdir(p)):
        if not fnmatch.fnmatchcase(name, PART_GLOB):
            continue
        mode = os.lstat(p / name).st_mode
        if PART_NAME.fullmatch(name) is None:
            stray.append((name, "a part name graftlab writes"))
        elif not stat.S_ISREG(mode):
            stray.append((name, f"a regular file ({file_kind(mode)})"))
        elif not _parquet(p / name):
            stray.append((name, "a Parquet file (a user's file under a part's name)"))
    if stray:
        name, why = stray[0]
        more = f" ({len(stray)} such entries)" if len(stray) > 1 else ""
        said = f"{what} {str(p)!r}" if what else str(p)
        raise GraftlabError(f"{said} holds {name!r}, which looks like a part of the trace but is not {why}{more}; "
                            "move it out of the folder before recording there (it is not graftlab's to move "
                            "or delete)", param=placeholders(what or ""))


def _parquet(path: Path) -> bool:
    """Whether ``path`` begins and ends with Parquet's magic bytes (a part graftlab wrote does; a
    text or a zero-byte file a user saved under a part's name does not). Read: 8 bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(-4, os.SEEK_END)
            return head == b"PAR1" and f.read(4) == b"PAR1"
    except OSError:  # shorter than 4 bytes (seek before the start), or unreadable
        return False


def check_parents(path: PathLike, what: str) -> None:
    """GraftlabError if a file (not a folder) stands where one of ``path``'s parents goes."""
    p = Path(path).expanduser()
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise _error(what, f"{what} {str(p)!r}: {str(parent)!r} is a file, not a folder")
            return


def check_output(
    path: Optional[PathLike],
    what: str,
    *,
    overwrite: bool = False,
    folder: bool = False,
    inputs: Iterable[tuple[str, Optional[PathLike]]] = (),
    new_traces: Iterable[Optional[PathLike]] = (),
    may_exist: bool = False,
    trace: bool = False,
) -> Optional[Path]:
    """Check the output ``path`` (a file, or a ``folder``) before anything is written; returns it.

    ``what`` names it in messages (``"metrics file"``). ``inputs`` are ``(name, path)`` pairs the
    command reads: the output may be none of them nor lie inside one. ``new_traces`` are trace
    folders the same command will create (``record``'s ``out``): the output may not go inside those
    either. An existing file output needs ``overwrite`` (an :class:`OutputExistsError`), unless
    ``may_exist`` (a folder the command adds files to, a trace to resume). A ``trace`` output (the
    trace folder ``record`` writes) may be a trace but not lie inside one. Raises
    :class:`GraftlabError` with one line naming the path and what is wrong.
    """
    if path is None:
        return None
    p = Path(path).expanduser()
    try:
        check_kind(p, what, folder and not (trace or overwrite))
        check_parents(p, what)
        return _check_output(p, what, overwrite=overwrite, folder=folder, inputs=inputs, new_traces=new_traces,
                             may_exist=may_exist, trace=trace)
    except (OSError, ValueError) as err:
        if isinstance(err, GraftlabError):
            raise
        raise _error(what, f"{what} {str(p)!r}: {describe_os_error(err)}") from None


def check_kind(p: Path, what: str, folder: bool = False) -> None:
    """The one rule on what an output path ``p`` may be, for the CLI's checks and the Recorder alike:
    a regular file or a folder, or nothing yet. A FIFO, a device or a socket is never replaced by a
    file (``-o /dev/null --overwrite``), and a symbolic link (dangling, a loop, or one to a file or
    trace elsewhere) is not written through nor replaced. ``folder`` is True only for a folder output
    that is added to (not a trace, nothing overwritten): that one may be a link. Names with a NUL byte
    are refused here, before any call that would raise ValueError. Raises GraftlabError naming
    ``what`` (a ``"{out}"`` placeholder names the flag)."""
    if "\x00" in str(p):
        raise _error(what, f"{what} {str(p)!r}: a path cannot hold a NUL byte")
    try:
        mode = os.lstat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a file among its parents: check_parents says which
        return
    if stat.S_ISLNK(mode):
        if folder and p.is_dir():
            return  # a folder reached through a link, only added to: files are created inside it, the link stays
        raise _error(what, f"{what} {str(p)!r} is a symbolic link; not writing through it nor replacing it: "
                            "give the path it points to, or another one")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise _error(what, f"{what} {str(p)!r} is {file_kind(mode)}; not replacing it: choose another path")


def _check_output(p: Path, what: str, *, overwrite: bool, folder: bool, inputs, new_traces, may_exist: bool,
                  trace: bool) -> Path:
    if folder:
        if p.exists() and not p.is_dir():
            raise _error(what, f"{what} {str(p)!r} is a file, not a folder")
    elif p.is_dir():
        raise _error(what, f"{what} {str(p)!r} is a folder, not a file")
    for name, source in inputs:
        if source is None:
            continue
        src = Path(source).expanduser()
        if _same(p, src) or (src.is_dir() and _within(p, src)):
            raise _error(what, f"{what} {str(p)!r} is the {name} {str(src)!r} (or inside it): choose another path")
    holder = trace_folder_of(p.parent if trace else p)
    if holder is not None:
        where = "is a trace folder" if holder == p else f"is inside the trace folder {str(holder)!r}"
        raise _error(what, f"{what} {str(p)!r} {where}, which holds only trace parts: choose a path outside it")
    if not trace and p.is_file() and _is_trace_file(p):
        raise _error(what, f"{what} {str(p)!r} is a graftlab trace; not replacing it with another kind of file")
    for t in new_traces:
        if t is not None and _within(p, Path(t).expanduser()):
            raise _error(
                what, f"{what} {str(p)!r} is inside the trace folder {str(Path(t))!r} this run writes, which holds "
                "only trace parts: choose a path outside it"
            )
    if not folder and not may_exist and p.exists() and not overwrite:
        raise OutputExistsError(p, what)
    return p


