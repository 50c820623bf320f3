"""Ctrl-C (SIGINT) and SIGTERM during ``graftlab record`` and ``graftlab train``: the run keeps its exit
status (130, 143), says on one stderr line where it stopped and what is on disk, and writes the
metrics of the steps it ran; the trace keeps every step run (the Recorder flushes on the way out).

Each case is a real ``graftlab`` process (``graftlab.cli.app.main``) that appends the number of each
optimizer step it completes to a progress file (a global step post-hook, as the kill suite's
worker does); the signal goes once a few steps are done.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graftlab import trace
from graftlab.runs import read_metrics
from tests import procs

ROOT = Path(__file__).resolve().parents[2]
AFTER = 3  # send the signal once this step (0-based) is done

RUNNER = """
import os, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
count, optimizer = [0], sys.argv[2]
def report(opt, args, kwargs):
    if type(opt).__name__ == optimizer:  # the run's optimizer (a Graft's children step too)
        os.write(out, f"{count[0]}\\n".encode())
        count[0] += 1
register_optimizer_step_post_hook(report)
from graftlab.cli.app import main
sys.argv = ["graftlab", *sys.argv[3:]]
main()
"""


def _reported(progress: Path) -> list[int]:
    return [int(x) for x in progress.read_text().split()] if progress.exists() else []


def _interrupt(tmp_path: Path, argv: list[str], sig: int, optimizer: str) -> tuple[int, str, int]:
    """Run ``graftlab argv``, send ``sig`` after step AFTER of the run's ``optimizer`` (class name);
    (exit status, stderr, steps reported)."""
    progress, err = tmp_path / "progress", tmp_path / "stderr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    with open(err, "w") as stderr, procs.started([sys.executable, "-c", RUNNER, progress, optimizer, *argv],
                                                 cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                                 stderr=stderr) as proc:
        deadline = time.monotonic() + procs.timeout(300)
        while AFTER not in _reported(progress):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the run ended or stalled before step {AFTER}:\n{err.read_text()}")
            time.sleep(0.01)
        proc.send_signal(sig)
        try:
            status = proc.wait(timeout=procs.timeout(120))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not stop after {name_of(sig)}:\n{err.read_text()}") from None
    return status, err.read_text(), len(_reported(progress))


def name_of(sig: int) -> str:
    return signal.Signals(sig).name


COMMON = ["--task", "bert", "--size", "tiny", "--batch-size", "2", "--steps", "5000", "--eval-every", "0",
          "--device", "cpu", "--seed", "0", "--quiet"]
SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}


@pytest.mark.parametrize("name", ["SIGINT", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_record_interrupted_writes_metrics_and_says_where(tmp_path, name):
    sig, code = SIGNALS[name]
    status, err, done = _interrupt(tmp_path, ["record", *COMMON, "--flush-every", "50", "-o", "t",
                                              "--metrics", "m.parquet"], sig, "Graft")
    assert status == code, err
    line = re.search(r"interrupted at step (\d+): trace t holds steps 0\.\.(\d+); "
                     r"metrics of steps 0\.\.(\d+) written to m\.parquet; "
                     r"the run cannot be resumed \(it has no checkpoint_dir\)", err)
    assert line, err
    steps, last_traced, last_metric = map(int, line.groups())
    assert steps >= done and last_traced == last_metric == steps - 1
    df = trace.read_trace(tmp_path / "t")
    assert sorted(df["step"].unique()) == list(range(steps))  # nothing lost: fewer than flush_every steps ran
    frame, meta = read_metrics(tmp_path / "m.parquet")
    assert frame["step"].tolist() == list(range(steps)) and frame["loss"].notna().all()
    assert meta["interrupted"] is True and meta["steps"] == steps


@pytest.mark.parametrize("name", [pytest.param("SIGINT", marks=pytest.mark.slow), "SIGTERM"])
def test_train_interrupted_writes_metrics_and_says_where(tmp_path, name):
    sig, code = SIGNALS[name]
    status, err, done = _interrupt(tmp_path, ["train", *COMMON, "--optimizer", "sgd", "--metrics", "m.parquet"], sig,
                                   "SGD")
    assert status == code, err
    line = re.search(r"interrupted at step (\d+): metrics of steps 0\.\.(\d+) written to m\.parquet; "
                     r"the run cannot be resumed \(it has no checkpoint_dir\)", err)
    assert line, err
    steps, last = map(int, line.groups())
    assert steps >= done and last == steps - 1
    frame, meta = read_metrics(tmp_path / "m.parquet")
    assert frame["step"].tolist() == list(range(steps)) and meta["interrupted"] is True


def test_info_says_a_trace_is_being_written_and_readers_see_complete_parts(tmp_path, capsys):
    """A trace another process is recording: ``graftlab info`` says so (with its pid), while
    ``read_trace`` and ``distill`` keep reading the complete parts."""
    from graftlab.cli.app import run

    progress = tmp_path / "progress"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    with procs.started([sys.executable, "-c", RUNNER, progress, "Graft", "record", *COMMON, "--flush-every", "2",
                        "-o", "t"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + procs.timeout(300)
        while len(trace.part_files(tmp_path / "t") if (tmp_path / "t").is_dir() else []) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the recording ended or stalled"
            time.sleep(0.01)
        capsys.readouterr()
        assert run(["info", str(tmp_path / "t"), "--no-groups"]) == 0
        assert f"being written by pid {proc.pid}" in capsys.readouterr().out
        df = trace.read_trace(tmp_path / "t")
        assert df["step"].min() == 0 and df["step"].nunique() >= 4
        assert run(["distill", str(tmp_path / "t"), "-w", "2", "-o", str(tmp_path / "c.json")]) == 0
        assert (tmp_path / "c.json").exists()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=procs.timeout(120))
    capsys.readouterr()
    assert run(["info", str(tmp_path / "t"), "--no-groups"]) == 0
    assert "being written" not in capsys.readouterr().out  # the writer is gone: nothing to say


@pytest.mark.slow
def test_record_resumed_after_interrupt_continues_its_metrics(tmp_path):
    """Ctrl-C, then the same command with --resume: the metrics file keeps the first process's rows
    before the checkpoint's step and gets the resumed ones after them (no --overwrite needed)."""
    # a constant schedule without warmup: the shorter resumed run gives the steps run the same rates
    argv = ["record", *COMMON, "--flush-every", "50", "-o", "t", "--metrics", "m.parquet",
            "--checkpoint-dir", "ck", "--checkpoint-every", "2", "--schedule", "constant", "--warmup", "0"]
    status, err, _ = _interrupt(tmp_path, argv, signal.SIGINT, "Graft")
    assert status == 130, err
    first, meta = read_metrics(tmp_path / "m.parquet")
    assert meta["interrupted"] is True
    steps = len(first) + 3
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    done = procs.run([sys.executable, "-m", "graftlab.cli.app", *argv, "--steps", str(steps), "--resume"],
                     seconds=300, cwd=tmp_path, env=env)
    at = int(re.search(r"resuming trace t at step (\d+)", done.stderr).group(1))
    frame, meta = read_metrics(tmp_path / "m.parquet")
    assert frame["step"].tolist() == list(range(steps)) and "interrupted" not in meta and meta["resumed_at"] == at
    assert frame["loss"].iloc[:at].tolist() == first["loss"].iloc[:at].tolist()
    assert sorted(trace.read_trace(tmp_path / "t")["step"].unique()) == list(range(steps))


@pytest.mark.parametrize("command", ["record", "train"])
def test_interrupted_says_where_resume_continues(tmp_path, command):
    """The newest checkpoint may lie steps before the step the run stopped at: the line says which
    step a resumed run continues from (not the trace's last step)."""
    extra = ["-o", "t"] if command == "record" else ["--optimizer", "sgd"]
    status, err, _ = _interrupt(tmp_path, [command, *COMMON, *extra, "--checkpoint-dir", "ck",
                                           "--checkpoint-every", "2"], signal.SIGTERM,
                                "Graft" if command == "record" else "SGD")
    assert status == 143, err
    line = re.search(r"interrupted at step (\d+)(?:: .*)?[:;] resuming continues from the checkpoint of step (\d+) in ck$",
                     err, re.M)
    assert line, err
    stopped, at = map(int, line.groups())
    assert at % 2 == 0 and stopped - 2 <= at <= stopped
