"""Files replaced only whole: written under a hidden temporary name beside the target, fsynced and
renamed into place (:func:`write_atomic`, :func:`replace`), so an interrupted or failed write, or a
crash of the machine, leaves the old file or nothing, never half a file.

Where a command may write is checked before this, by :func:`graftlab.trace.outputs.check_output`.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Callable, Union

from graftlab.errors import OutputExistsError
from graftlab.io.fsutil import clean_temporaries, create_temporary, replace_durably

PathLike = Union[str, os.PathLike]


def replace(tmp: PathLike, path: PathLike) -> None:
    """Rename the complete file ``tmp`` onto ``path``: atomic on one filesystem, and durable (the
    data and the rename are fsynced; :func:`graftlab.io.fsutil.replace_durably`)."""
    replace_durably(tmp, path)


def write_atomic(path: PathLike, write: Callable[[Path], None], *, overwrite: bool = True,
                 what: str = "output") -> Path:
    """Create ``path`` whole: ``write(tmp)`` fills a hidden temporary file beside it, which is then
    renamed onto ``path``; on any error the temporary file is removed and ``path`` is untouched.

    With ``overwrite=False`` a file that appeared at ``path`` meanwhile is an OutputExistsError.
    A new file gets the mode any program's new file gets (``0o666`` less the umask); a replaced
    file keeps its mode.
    """
    path = Path(path)
    clean_temporaries(path.parent if str(path.parent) else ".", re.escape(path.name))
    tmp, fd = create_temporary(path)
    try:
        write(tmp)
        _keep_mode(path, tmp)
        if not overwrite and path.exists():
            raise OutputExistsError(path, what)
        replace(tmp, path)
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)
    return path


def _keep_mode(path: Path, tmp: Path) -> None:
    """Give ``tmp`` the permission bits of the file it is about to replace, if there is one."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:  # no file to replace (or it vanished): the new file's own mode stands
        return
    os.chmod(tmp, mode)


def write_text(path: PathLike, text: str, **kwargs) -> Path:
    """:func:`write_atomic` of a UTF-8 text."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), **kwargs)
