"""Never destroy before validating; resume and checkpoints lose no step; one writer per trace.

The Recorder-level cases of the hardening issue, each as the measured failure it was: a resume
that deleted every part, an overwrite that turned a user's file into a folder or deleted the files
kept beside a trace, a checkpoint that did not flush the trace, a flush one step late, SIGTERM
losing the buffered rows, two writers interleaving one trace.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import graftlab
from graftlab import trace
from graftlab.io import termination
from graftlab.distributed import Checkpoints, save_checkpoint
from graftlab.distributed.checkpoints import checkpoints_for
from graftlab.errors import GraftlabError, OutputExistsError
from graftlab.record.recorder import Recorder
from graftlab.trace.lock import TraceLock
from tests import models, procs

ROOT = Path(__file__).resolve().parents[1]
G = 16  # groups of the block model


def setup(seed: int = 0):
    torch.set_num_threads(1)
    model = models.make("block", dtype=torch.float32, seed=seed)
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2),
                           torch.optim.SGD(model.parameters(), lr=0.1), names=model)
    return model, graft


def step(model, graft, rec=None, seed: int = 1):
    x, y = models.batches("block", 1, dtype=torch.float32, seed=seed + graft.steps)[0]
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    graft.step()
    graft.zero_grad()
    if rec is not None:
        rec.log(loss=loss.detach())


def recorded(path) -> list[int]:
    if not trace.part_files(path):
        return []
    per_step = trace.read_trace(path).groupby("step").size()
    assert (per_step == G).all()
    return per_step.index.tolist()


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def make_trace(path, steps=8, seed=0, **kw):
    model, graft = setup()
    with Recorder(graft, path, flush_every=4, metadata={"seed": seed}, **kw) as rec:
        for _ in range(steps):
            step(model, graft, rec)
    return model, graft


# --- 1. never destroy before validating ---------------------------------------------------------

def test_resume_with_a_fresh_graft_keeps_every_part(tmp_path):
    make_trace(tmp_path / "t")
    before = files(tmp_path / "t")
    _, fresh = setup()  # steps 0: the checkpoint was not loaded
    with pytest.raises(GraftlabError, match=r"would drop every recorded step \(0..7\).*load the optimizer's checkpoint"):
        Recorder(fresh, tmp_path / "t", resume=True)
    assert files(tmp_path / "t") == before
    with Recorder(fresh, tmp_path / "t", resume=True, overwrite=True, flush_every=2):  # asked for: start over
        pass
    assert files(tmp_path / "t") == before  # but nothing was recorded: the old trace stays whole
    model, fresh = setup()
    with Recorder(fresh, tmp_path / "t", resume=True, overwrite=True, flush_every=2) as rec:
        step(model, fresh, rec)
    assert recorded(tmp_path / "t") == [0]  # replaced once the new run's first part was on disk


def test_resume_refuses_a_gap_and_another_run(tmp_path):
    make_trace(tmp_path / "t", steps=8)
    before = files(tmp_path / "t")
    _, graft = setup()
    with pytest.raises(GraftlabError, match=r"ends at step 7 but the run resumes at step 12: steps 8..11 would be missing"):
        Recorder(graft, tmp_path / "t", resume=True, start_step=12)
    with pytest.raises(GraftlabError, match="recorded with seed=0 and this run has seed=1"):
        Recorder(graft, tmp_path / "t", resume=True, start_step=8, metadata={"seed": 1})
    assert files(tmp_path / "t") == before
    with Recorder(graft, tmp_path / "t", resume=True, start_step=8, metadata={"seed": 0}):
        pass  # the same run, right after its last step: fine


def test_overwrite_never_turns_a_file_into_a_folder_nor_deletes_files_beside_the_trace(tmp_path):
    _, graft = setup()
    mine = tmp_path / "notes.txt"
    mine.write_text("a user's file")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(GraftlabError, match="is a file, not a trace folder"):
            Recorder(graft, mine, **kw)
    assert mine.read_text() == "a user's file"

    make_trace(tmp_path / "t", steps=8)
    (tmp_path / "t" / "README.txt").write_text("what this run was")
    model, graft = setup()
    with Recorder(graft, tmp_path / "t", overwrite=True, flush_every=2) as rec:
        step(model, graft, rec)
    assert recorded(tmp_path / "t") == [0]
    assert (tmp_path / "t" / "README.txt").read_text() == "what this run was"


def test_a_trace_never_goes_inside_another(tmp_path):
    make_trace(tmp_path / "t")
    _, graft = setup()
    with pytest.raises(GraftlabError, match="inside the trace folder"):
        Recorder(graft, tmp_path / "t" / "inner")
    assert not (tmp_path / "t" / "inner").exists()


def test_a_failed_open_leaves_no_folder(tmp_path):
    _, graft = setup()
    with pytest.raises(GraftlabError, match="metadata keys"):
        Recorder(graft, tmp_path / "new", metadata={"groups": []})
    assert not (tmp_path / "new").exists()


# --- 2. resume and checkpoints that lose no step ------------------------------------------------

@pytest.mark.parametrize("every", [1, 2])
def test_flush_every_loses_at_most_that_many_steps(tmp_path, every):
    """After each step, every recorded step but the last flush_every is on disk (the flush used to
    run one step late, so a kill could lose flush_every + 1)."""
    model, graft = setup()
    flush = 5
    with Recorder(graft, tmp_path / "t", flush_every=flush, every=every) as rec:
        for s in range(23):
            step(model, graft, rec)
            taken = [k for k in range(s + 1) if k % every == 0]
            assert len(taken) - len(recorded(tmp_path / "t")) <= flush
            if len(taken) % flush == 0 and len(taken):
                assert len(recorded(tmp_path / "t")) >= len(taken) - flush


def test_a_checkpoint_waits_for_the_trace(tmp_path):
    """Every step before a checkpoint is on disk when it is committed (graftlab.json written)."""
    model, graft = setup()
    seen = []
    with Recorder(graft, tmp_path / "t", flush_every=50) as rec:
        for s in range(7):
            step(model, graft, rec)
        import graftlab.distributed.checkpoints as ck

        real = ck.write_text

        def commit(path, text, **kw):
            seen.append(recorded(tmp_path / "t"))  # what a kill right now would leave
            return real(path, text, **kw)

        ck.write_text = commit
        try:
            save_checkpoint(tmp_path / "ck", model, graft, extra={"step": 7})
        finally:
            ck.write_text = real
    assert seen == [list(range(7))]


def test_resume_after_the_final_checkpoint_completes_instead_of_refusing(tmp_path):
    model, graft = setup()

    class Config:
        checkpoint_dir, checkpoint_every, resume, steps = str(tmp_path / "ck"), 2, True, 4

    ckpt = Checkpoints(Config.checkpoint_dir, model, graft, every=2)
    for s in range(4):
        step(model, graft)
        ckpt.maybe_save(s + 1, last=s == 3)
    model2, graft2 = setup()
    ckpt2, first = checkpoints_for(Config, model2, graft2)
    assert first == 4 and graft2.steps == 4  # nothing left to train: the run just ends
    Config.steps = 3
    with pytest.raises(GraftlabError, match="has done 4 steps already"):
        checkpoints_for(Config, *setup())


def test_a_second_writer_is_refused(tmp_path):
    model, graft = setup()
    with Recorder(graft, tmp_path / "t", flush_every=2) as rec:
        step(model, graft, rec)
        step(model, graft, rec)
        _, other = setup(seed=1)
        for kw in ({"overwrite": True}, {"resume": True, "start_step": 2}):
            with pytest.raises(GraftlabError, match="being written by another process"):
                Recorder(other, tmp_path / "t", **kw)
        step(model, graft, rec)
    assert recorded(tmp_path / "t") == [0, 1, 2]  # the first run's rows, whole
    with Recorder(other, tmp_path / "t", overwrite=True):  # free again once closed
        pass


def test_lock_released_when_the_holder_dies(tmp_path):
    (tmp_path / "t").mkdir()
    code = ("import sys, time; sys.path.insert(0, %r); from graftlab.trace.lock import TraceLock; "
            "TraceLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)") % str(ROOT)
    with procs.started([sys.executable, "-c", code, tmp_path / "t"], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(GraftlabError, match=rf"another process \(pid {proc.pid}\)"):
            TraceLock(tmp_path / "t").acquire()
    TraceLock(tmp_path / "t").acquire().release()  # the kernel dropped it with the process


TERM_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import graftlab
    from graftlab.record.recorder import Recorder
    from tests import models
    torch.set_num_threads(1)
    model = models.make("block", dtype=torch.float32)
    opt = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-3),
                         torch.optim.SGD(model.parameters(), lr=0.1), names=model)
    rec = Recorder(opt, sys.argv[1], flush_every=1000)
    progress = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    x, y = models.batches("block", 1, dtype=torch.float32)[0]
    while True:
        loss = (model(x) - y).pow(2).mean(); loss.backward(); opt.step(); opt.zero_grad()
        rec.log(loss=loss.detach())
        os.write(progress, b"%d\\n" % (opt.steps - 1))
    """
)


def test_sigterm_writes_the_buffered_rows(tmp_path):
    """SIGTERM (torchrun, Slurm, kill) used to lose every buffered row; now none, exit status 143."""
    script = tmp_path / "rec.py"
    script.write_text(TERM_SCRIPT.format(root=str(ROOT)))
    progress = tmp_path / "progress"
    with procs.started([sys.executable, script, tmp_path / "t", progress], cwd=ROOT) as proc:
        deadline = time.monotonic() + procs.timeout(300)
        while time.monotonic() < deadline and len(progress.read_text().split() if progress.exists() else []) < 30:
            time.sleep(0.01)
        assert proc.poll() is None, "recording process ended early"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=procs.timeout(60)) == 143
    done = [int(s) for s in progress.read_text().split()]
    assert len(done) >= 30
    assert recorded(tmp_path / "t")[: len(done)] == done  # every completed step, though none was flushed
    df = trace.read_trace(tmp_path / "t")
    assert np.isfinite(df["norm_m"].to_numpy()).all()


def test_sigterm_handler_only_while_recording_and_never_over_anothers(tmp_path):
    from graftlab.record import recorder as record

    for rec in list(record._OPEN):  # recorders other tests left open keep the handler installed
        rec.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    _, graft = setup()
    with Recorder(graft, tmp_path / "a"):
        assert signal.getsignal(signal.SIGTERM) is termination._handler
        with Recorder(graft, tmp_path / "b"):
            pass
        assert signal.getsignal(signal.SIGTERM) is termination._handler  # one is still open
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def mine(signum, frame):
        pass

    signal.signal(signal.SIGTERM, mine)
    try:
        with Recorder(graft, tmp_path / "c"):
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_sigterm_inside_a_flush_waits_for_its_end(tmp_path):
    _, graft = setup()
    with Recorder(graft, tmp_path / "t"):  # an open Recorder: the handler acts
        with pytest.raises(SystemExit) as exc:
            with termination.deferred():
                termination._handler(signal.SIGTERM, None)  # arrives mid-section: noted, not raised
                reached = True
    assert reached and exc.value.code == 143


def test_sigterm_after_every_recorder_is_gone_is_the_default_again(tmp_path):
    """A Recorder collected without close() does not leave SIGTERM caught for good."""
    import gc

    code = ("import gc, os, signal, sys, time, torch; sys.path.insert(0, %r); import graftlab; "
            "from graftlab.record.recorder import Recorder; from tests import models; "
            "m = models.make('mlp'); g = graftlab.Graft(torch.optim.Adam(m.parameters()), torch.optim.SGD(m.parameters(), lr=0.1), names=m); "
            "r = Recorder(g, sys.argv[1]); assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL; "
            "del r, g; gc.collect(); os.kill(os.getpid(), signal.SIGTERM); time.sleep(30); print('survived')") % str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGTERM, proc.stderr  # killed by the signal, as Python's default does
    assert "survived" not in proc.stdout
    gc.collect()


# --- the record command's resume without a checkpoint ---------------------------------------------

def _config(tmp_path, **kw):
    from graftlab.runs import RecordConfig

    base = dict(task="bert", steps=40, batch_size=2, eval_every=0, device="cpu", out=str(tmp_path / "t"),
                checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=10, resume=True)
    return RecordConfig(**{**base, **kw})


def _bert_like_trace(tmp_path, steps: int, seed: int = 0, **kw):
    """A trace whose metadata says it is the run _config describes (seed and kw aside)."""
    import dataclasses

    model, graft = setup()
    cfg = dataclasses.asdict(_config(tmp_path, seed=seed, resume=False, **kw))
    with Recorder(graft, tmp_path / "t", flush_every=4, metadata={"seed": seed, "config": cfg}) as rec:
        for _ in range(steps):
            step(model, graft, rec)


def test_resume_without_checkpoint_refuses_to_drop_steps(tmp_path):
    _bert_like_trace(tmp_path, steps=12)  # a checkpoint was due at step 10
    before = files(tmp_path / "t")
    with pytest.raises(GraftlabError, match="holds no complete checkpoint.*a checkpoint was due at step 10"):
        _config(tmp_path).validate()
    assert files(tmp_path / "t") == before


def test_resume_without_checkpoint_refuses_another_runs_trace(tmp_path):
    _bert_like_trace(tmp_path, steps=6, seed=1)
    with pytest.raises(GraftlabError, match=r"another run's \(seed=1, this run has seed=0\)"):
        _config(tmp_path).validate()
    _config(tmp_path, seed=1).validate()  # its own start, cut before the first checkpoint: starts over
    with pytest.raises(OutputExistsError):
        _config(tmp_path, resume=False).validate()


def test_resume_without_checkpoint_refuses_a_trace_recorded_without_them(tmp_path):
    _bert_like_trace(tmp_path, steps=6, checkpoint_dir=None, checkpoint_every=0)
    with pytest.raises(GraftlabError, match="recorded without checkpoint_dir"):
        _config(tmp_path).validate()


@pytest.mark.slow
def test_record_resumed_after_its_final_checkpoint_completes(tmp_path):
    """Killed after the final checkpoint but before the end: --resume used to refuse ("has done 4
    steps already"); now it finishes the run with the trace whole and unchanged."""
    from dataclasses import replace

    from graftlab.runs import RecordConfig
    from graftlab.runs import record

    cfg = RecordConfig(task="bert", steps=4, batch_size=2, eval_every=0, eval_size=2, device="cpu", flush_every=3,
                       out=str(tmp_path / "t"), checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=2)
    record(cfg, progress=False)
    before = files(tmp_path / "t")
    again = record(replace(cfg, resume=True), progress=False)
    assert again.fit.steps == 4 and len(again.fit.metrics) == 0  # no step left to take
    assert files(tmp_path / "t") == before
