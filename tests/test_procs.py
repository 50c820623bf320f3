"""tests/procs.py: a stalled child is stopped with every process it started, even one in a session
of its own (as torchrun starts its workers), and the failure shows what it wrote on stderr."""
from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from tests import procs

LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(worker.pid))
print("launcher: worker started", file=sys.stderr, flush=True)
time.sleep(600)
"""


def _gone(pid: int, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _worker_pid(path) -> int:
    end = time.monotonic() + 60
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < end, "the launcher did not start its worker"
        time.sleep(0.05)
    return int(path.read_text())


@pytest.mark.slow  # 20 s: its timeout leaves a loaded machine time to start the launcher
def test_a_stalled_run_is_stopped_with_its_workers_and_shows_its_stderr(tmp_path, monkeypatch):
    monkeypatch.delenv("GRAFTLAB_TEST_TIMEOUT_SCALE", raising=False)
    pid_file = tmp_path / "worker.pid"
    with pytest.raises(pytest.fail.Exception) as failed:
        procs.run([sys.executable, "-c", LAUNCHER, pid_file], seconds=20)
    assert "did not finish in 20 s" in str(failed.value) and "launcher: worker started" in str(failed.value)
    assert _gone(_worker_pid(pid_file)), "the worker in its own session outlived the stopped run"


def test_started_stops_the_tree_when_the_block_ends(tmp_path):
    pid_file = tmp_path / "worker.pid"
    with procs.started([sys.executable, "-c", LAUNCHER, pid_file]) as proc:
        worker = _worker_pid(pid_file)
        assert psutil.pid_exists(worker)
    assert proc.returncode is not None and _gone(worker)


def test_a_failed_run_shows_its_stderr_and_a_passing_one_returns_its_output():
    with pytest.raises(pytest.fail.Exception, match=r"exited 3 .*\n.*boom"):
        procs.run([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], seconds=60)
    done = procs.run([sys.executable, "-c", "print('ok')"], seconds=60)
    assert done.returncode == 0 and done.stdout == "ok\n"


def test_timeouts_scale_for_slower_machines(monkeypatch):
    monkeypatch.setenv("GRAFTLAB_TEST_TIMEOUT_SCALE", "3")
    assert procs.timeout(100) == 300
    monkeypatch.setenv("GRAFTLAB_TEST_TIMEOUT_SCALE", "0.5")  # never below the base
    assert procs.timeout(100) == 100
    assert os.environ["GRAFTLAB_TEST_TIMEOUT_SCALE"] == "0.5"
