"""SIGTERM handled like Ctrl-C while a :class:`~graftlab.Recorder` is open, so buffered rows are written.

Python's default for SIGTERM (what ``torchrun``, Slurm and ``kill`` send) is to die at once: no
``finally``, no ``atexit``, and the rows a Recorder holds in its buffer are lost, while Ctrl-C
unwinds and closes it. While any Recorder is open in the process, :func:`watch` replaces the default
with a handler that raises ``SystemExit(143)`` (128 + SIGTERM, the exit status a shell reports for
it) in the main thread: ``with`` blocks and ``finally`` clauses run, every open Recorder is flushed,
and the process still exits as asked. Inside :func:`deferred` sections (a Recorder's own flush and
close) the signal waits until the section ends, so a flush is never cut in half.

Only a handler that is still Python's default is replaced (never one a framework or the user
installed), only from the main thread, and the default comes back when the last Recorder closes.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

EXIT_CODE = 128 + signal.SIGTERM

_lock = threading.Lock()
_watchers = 0
_installed = False
_depth = 0  # deferred sections open on the main thread
_pending = False


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if _depth:
        _pending = True
        return
    raise SystemExit(EXIT_CODE)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def watch() -> None:
    """One more open Recorder: handle SIGTERM (see the module doc) while any is open."""
    global _watchers, _installed
    with _lock:
        _watchers += 1
        if _installed or not _main_thread():
            return
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _handler)
                _installed = True
        except (ValueError, OSError):  # not the main interpreter, or no such signal here
            pass


def unwatch() -> None:
    """One Recorder fewer; the last one puts Python's default back."""
    global _watchers, _installed
    with _lock:
        _watchers = max(0, _watchers - 1)
        if _watchers or not _installed or not _main_thread():
            return
        try:
            if signal.getsignal(signal.SIGTERM) is _handler:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _installed = False
        except (ValueError, OSError):
            pass


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section SIGTERM does not interrupt: a signal arriving inside it takes effect at its end."""
    global _depth, _pending
    if not _main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            _pending = False
            raise SystemExit(EXIT_CODE)
