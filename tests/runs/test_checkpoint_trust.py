"""Checkpoints belong to their run: digests checked before DCP unpickles anything, run ids read
from disk never become paths, another run's checkpoint folder refused, a failed save keeps the
old checkpoint (security and data-loss probes of the README's reliability table)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from graftlab.distributed.checkpoints import CHECKPOINT_META, Checkpoints, load_checkpoint, resume_step, save_checkpoint
from graftlab.distributed.trust import check_same_run, run_identity
from graftlab.errors import GraftlabError


def model_and_opt(seed=0):
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def saved(tmp_path: Path, name: str = "ck", **extra) -> Path:
    model, opt = model_and_opt()
    return save_checkpoint(tmp_path / name, model, opt, extra={"step": 1, **extra})


class Boom:
    """What a crafted .metadata would hold: unpickling it runs code (here: creates a file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_checkpoint_records_the_digest_of_every_file(tmp_path):
    ck = saved(tmp_path)
    meta = json.loads((ck / CHECKPOINT_META).read_text())
    assert ".metadata" in meta["digests"] and set(meta["digests"]) == {p.name for p in ck.iterdir()} - {CHECKPOINT_META}
    model, opt = model_and_opt(seed=1)
    assert load_checkpoint(ck, model, opt)["extra"]["step"] == 1


def test_a_crafted_metadata_pickle_is_never_loaded(tmp_path):
    ck = saved(tmp_path)
    marker = tmp_path / "pwned"
    (ck / ".metadata").write_bytes(pickle.dumps(Boom(str(marker))))
    model, opt = model_and_opt()
    with pytest.raises(GraftlabError, match="digest differs"):
        load_checkpoint(ck, model, opt)
    assert not marker.exists()


def test_a_changed_shard_is_refused(tmp_path):
    ck = saved(tmp_path)
    shard = next(p for p in ck.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(GraftlabError, match="not the one saved"):
        load_checkpoint(ck, *model_and_opt())


@pytest.mark.parametrize("case", ["no digests", "no shards", "digest names a path", "not an object"])
def test_checkpoints_graftlab_did_not_save_whole_are_refused(tmp_path, case):
    ck = saved(tmp_path)
    meta = json.loads((ck / CHECKPOINT_META).read_text())
    if case == "no digests":
        del meta["digests"]
    elif case == "no shards":
        for p in ck.iterdir():
            if p.name != CHECKPOINT_META:
                p.unlink()
    elif case == "digest names a path":
        meta["digests"]["../../etc/passwd"] = "0" * 64
    else:
        meta = ["graftlab.checkpoint/1"]
    (ck / CHECKPOINT_META).write_text(json.dumps(meta))
    with pytest.raises(GraftlabError):
        load_checkpoint(ck, *model_and_opt())


@pytest.mark.parametrize("run_id", ["/../../X", "../x", "a/b", "", "x" * 65, 7])
def test_a_run_id_read_from_disk_never_becomes_a_path(tmp_path, run_id):
    folder = tmp_path / "cks"
    model, opt = model_and_opt()
    save_checkpoint(folder / "step-00000002", model, opt, extra={"step": 2, "run": run_id})
    ckpt = Checkpoints(folder, model, opt)
    for act in (ckpt.latest, lambda: ckpt.resume(folder / "step-00000002"), lambda: ckpt.save(3)):
        with pytest.raises(GraftlabError, match="run id"):  # never resumed from, never part of a name
            act()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_dir()) == ["cks", "step-00000002"]


def config(**kw):
    base = dict(task="bert", size="tiny", data=None, seed=0, batch_size=2, magnitude="adam", direction="sgd",
                magnitude_lr=None, direction_lr=None, m_hparams={}, d_hparams={}, granularity="layer", every=1,
                out="t", checkpoint_dir="ck", resume=True)
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize("other", [{"seed": 1}, {"out": "another-trace"}, {"batch_size": 4}, {"direction": "adagrad"}])
def test_another_runs_checkpoint_folder_is_refused(tmp_path, monkeypatch, other):
    monkeypatch.chdir(tmp_path)
    model, opt = model_and_opt()
    save_checkpoint(tmp_path / "ck" / "step-00000002", model, opt,
                    extra={"step": 2, "run": "abc", "identity": run_identity(config())})
    check_same_run(tmp_path / "ck" / "step-00000002", config())  # its own run resumes
    assert resume_step(config()) == 2
    if "out" in other:  # another recording's trace: one that holds parts
        (tmp_path / other["out"]).mkdir()
        (tmp_path / other["out"] / "part-000000000000.parquet").write_bytes(b"")
    with pytest.raises(GraftlabError, match="belongs to another run"):
        resume_step(config(**other))


def test_a_checkpoint_starts_a_new_trace_folder(tmp_path, monkeypatch):
    """A trace folder without parts rewrites no other recording's rows: the run resumes into it."""
    monkeypatch.chdir(tmp_path)
    model, opt = model_and_opt()
    save_checkpoint(tmp_path / "ck" / "step-00000002", model, opt,
                    extra={"step": 2, "run": "abc", "identity": run_identity(config())})
    assert resume_step(config(out="new-trace")) == 2


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path):
    ck = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    if subprocess.run(["chattr", "+i", str(tmp_path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and ext4-like filesystems)")
    try:
        model, opt = model_and_opt(seed=3)
        with pytest.raises(GraftlabError, match="saving the checkpoint failed"):
            save_checkpoint(ck, model, opt, extra={"step": 9}, overwrite=True)
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path)], check=True)
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


def test_a_save_onto_a_full_disk_is_one_line_and_keeps_the_old_checkpoint(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes every write past 64 KiB fail as a full disk does;
    torch's own message for it ("unexpected pos") becomes the system's reason."""
    ck = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        import torch
        from torch import nn
        from graftlab.distributed.checkpoints import save_checkpoint
        from graftlab.errors import GraftlabError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with an error instead of a signal
        model = nn.Linear(512, 512)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        try:
            save_checkpoint({str(ck)!r}, model, opt, extra={{"step": 9}}, overwrite=True)
        except GraftlabError as err:
            print("error:", err)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [l for l in res.stdout.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "saving the checkpoint failed" in lines[0], res.stdout + res.stderr
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no half-written checkpoint left beside it


def test_a_killed_saves_folder_is_removed_by_the_next_save_and_a_live_one_kept(tmp_path):
    from graftlab.distributed.trust import hold

    folder = tmp_path / "cks"
    folder.mkdir()
    stale = folder / f".step-00000002.{'a' * 16}.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half")
    live = folder / f".step-00000003.{'b' * 16}.tmp"
    fd = hold(live)  # another process's save in progress
    (folder / ".step-notes.tmp").mkdir()  # not graftlab's pattern: a user's
    try:
        model, opt = model_and_opt()
        save_checkpoint(folder / "step-00000004", model, opt, extra={"step": 4})
        assert sorted(p.name for p in folder.iterdir()) == [live.name, ".step-notes.tmp", "step-00000004"]
    finally:
        os.close(fd)
