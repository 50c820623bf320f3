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
import os
import signal
import threading
import weakref
from typing import Any, Iterator

EXIT_CODE = 128 + signal.SIGTERM

_lock = threading.Lock()
_watchers: "weakref.WeakSet[Any]" = weakref.WeakSet()  # open Recorders (one collected unclosed drops out)
_installed = False
_depth = 0  # deferred sections open on the main thread
_pending = False


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if not _watchers:  # every Recorder is gone (collected without close): Python's default after all
        _uninstall()
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if _depth:
        _pending = True
        return
    raise SystemExit(EXIT_CODE)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _uninstall() -> None:
    global _installed
    try:
        if signal.getsignal(signal.SIGTERM) is _handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _installed = False
    except (ValueError, OSError):  # not the main thread or interpreter
        pass


def watch(owner: Any) -> None:
    """``owner`` (a Recorder) is open: handle SIGTERM (see the module doc) while any is."""
    global _installed
    with _lock:
        _watchers.add(owner)
        if _installed or not _main_thread():
            return
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _handler)
                _installed = True
        except (ValueError, OSError):  # not the main interpreter, or no such signal here
            pass


def unwatch(owner: Any) -> None:
    """``owner`` is closed; when no Recorder is open any more, Python's default comes back."""
    with _lock:
        _watchers.discard(owner)
        if not _watchers and _installed and _main_thread():
            _uninstall()


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
