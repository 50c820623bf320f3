"""Warnings as the command line says everything else: one line each, without Python's file paths.

Python prints a warning as ``/path/to/module.py:123: UserWarning: message`` followed by the source
line that raised it; on a terminal that reads as a crash. :func:`one_line_warnings` prints
``warning: message`` instead (whitespace folded to one line), to stderr, once per distinct message.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any, Iterator


@contextlib.contextmanager
def one_line_warnings(stream: Any = None) -> Iterator[None]:
    """Inside the block, each warning is one ``warning: ...`` line on ``stream`` (default stderr)."""
    seen: set[str] = set()

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = " ".join(str(message).split())
        if text in seen:
            return
        seen.add(text)
        print(f"warning: {text}", file=stream or sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
