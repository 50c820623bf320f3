"""Child processes for the tests: each in a process group of its own, stopped with everything it
started, its stderr in the failure message.

A test that launches torchrun, a fork server or a recording must neither hang the suite nor leave
workers behind when it fails or stalls. ``subprocess.run(..., timeout=)`` kills only the direct
child, and torchrun starts each worker in a session of its own (so killing torchrun's group misses
them): a stalled launch left its rank-0 worker running, and its captured stderr was never shown.
Here every child starts with ``start_new_session=True``, and :func:`stop` first sends SIGTERM to its
group (torchrun passes it on to its workers), then SIGKILLs every process of the tree it found
before (its group and its descendants in other sessions). Output goes to files, not pipes, so a
worker that outlives its parent cannot block the reader, and what a killed run printed is kept.

Timeouts are what a run takes on a loaded 2-core machine (eight jobs sharing two cores: five to ten
times its time alone), times ``GRAFTLAB_TEST_TIMEOUT_SCALE`` (default 1) for slower machines.
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
TAIL = 4000  # characters of stderr shown in a failure message


def timeout(seconds: float) -> float:
    """``seconds`` scaled by ``GRAFTLAB_TEST_TIMEOUT_SCALE`` (a factor >= 1 for slower machines)."""
    return seconds * max(1.0, float(os.environ.get("GRAFTLAB_TEST_TIMEOUT_SCALE") or 1))


def spawn(cmd: Sequence[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **kwargs)`` in a new session (its own process group); stop it with
    :func:`stop` (or use :func:`started`)."""
    return subprocess.Popen(list(map(str, cmd)), start_new_session=True, **kwargs)


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        parent = psutil.Process(proc.pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc`` and every process it started: SIGTERM to its group, ``grace`` seconds, then
    SIGKILL to its group and to each descendant found before the SIGTERM. Safe on an exited run
    (it still clears stragglers left in its group)."""
    tree = _tree(proc) if proc.poll() is None else []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    else:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        # a launcher that exited has passed the signal on (torchrun does) or never will: its
        # workers in sessions of their own get a second to leave by themselves
        psutil.wait_procs([p for p in tree[1:] if _alive(p)], timeout=1.0 if proc.poll() is not None else grace)
    for p in tree[1:]:
        if _alive(p):
            try:
                p.kill()
            except psutil.Error:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextmanager
def started(cmd: Sequence[str], **kwargs) -> Iterator[subprocess.Popen]:
    """:func:`spawn`, stopped with its whole tree when the block ends (whatever the outcome)."""
    proc = spawn(cmd, **kwargs)
    try:
        yield proc
    finally:
        stop(proc)


def run(cmd: Sequence[str], *, seconds: float, check: bool = True, cwd: Optional[Path] = None,
        env: Optional[dict] = None, input: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end in its own process group; ``CompletedProcess`` with text stdout/stderr.

    Past ``timeout(seconds)`` the run is stopped with its tree and the test fails with the stderr it
    wrote; with ``check`` a non-zero exit fails the test the same way."""
    limit = timeout(seconds)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = spawn(cmd, cwd=cwd, env=env, stdout=out, stderr=err,
                     stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL, text=True)
        start = time.monotonic()
        try:
            proc.communicate(input, timeout=limit)
        except subprocess.TimeoutExpired:
            stop(proc)
            pytest.fail(f"{_show(cmd)} did not finish in {limit:.0f} s; stopped with every process it started. "
                        f"stderr:\n{_read(err)[-TAIL:]}\nstdout:\n{_read(out)[-TAIL // 2:]}", pytrace=False)
        finally:
            stop(proc)  # stragglers its exit left in the group
        result = subprocess.CompletedProcess(cmd, proc.returncode, _read(out), _read(err))
    if check and result.returncode != 0:
        pytest.fail(f"{_show(cmd)} exited {result.returncode} after {time.monotonic() - start:.0f} s. "
                    f"stderr:\n{result.stderr[-TAIL:]}\nstdout:\n{result.stdout[-TAIL // 2:]}", pytrace=False)
    return result


def _read(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()


def _show(cmd: Sequence[str]) -> str:
    text = " ".join(map(str, cmd))
    return f"`{text[:300]}`"
