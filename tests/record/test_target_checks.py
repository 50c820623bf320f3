"""Every check on a recording's output folder happens before the run trains: a user's file there
that looks like a part of the trace (a copy, a link, a folder) is refused up front, and kept."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch

import graftlab
from graftlab.cli.app import run
from graftlab.errors import GraftlabError
from graftlab.record.recorder import Recorder
from tests import models

STRAYS = {
    "copy": lambda d: (d / "part-000000000000 (1).parquet").write_bytes(b"my copy"),
    "renamed": lambda d: (d / "part-final.parquet").write_text("notes"),
    "folder": lambda d: (d / "part-000000000099.parquet").mkdir(),
    "link": lambda d: os.symlink(d.parent / "elsewhere.parquet", d / "part-000000000099.parquet"),
    "text under a part's name": lambda d: (d / "part-999999999999.parquet").write_text("my notes"),
    "empty under a part's name": lambda d: (d / "part-000000000099.parquet").write_bytes(b""),
}


def setup():
    torch.set_num_threads(1)
    model = models.make("block", dtype=torch.float32)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, graftlab.Graft(adam, sgd, names=model)


def recorded(path: Path) -> Path:
    model, opt = setup()
    with Recorder(opt, path, flush_every=2) as rec:
        for x, y in models.batches("block", 4, dtype=torch.float32):
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=1.0)
    return path


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = ("link" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes().hex())
    return out


@pytest.mark.parametrize("stray", list(STRAYS))
@pytest.mark.parametrize("mode", ["overwrite", "resume"])
def test_recorder_refuses_a_stray_part_before_anything_changes(tmp_path, stray, mode):
    t = recorded(tmp_path / "t")
    STRAYS[stray](t)
    before = snapshot(tmp_path)
    model, opt = setup()
    with pytest.raises(GraftlabError, match=r"looks like a part of the trace.*move it out") as err:
        Recorder(opt, t, **{mode: True}, start_step=4 if mode == "resume" else 0)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before  # the user's file and the old trace, as they were


@pytest.mark.parametrize("trace_there", [False, True])
@pytest.mark.parametrize("overwrite", ["", " --overwrite"])
def test_a_stray_part_is_named_first_not_the_overwrite_that_cannot_help(tmp_path, capsys, trace_there, overwrite):
    t = recorded(tmp_path / "t") if trace_there else tmp_path / "t"
    t.mkdir(exist_ok=True)
    (t / "part-notes.parquet").write_text("my notes")
    before = snapshot(tmp_path)
    code = run(shlex.split(f"record -o {t}{overwrite} --steps 1 --batch-size 2 --device cpu --eval-every 0 --quiet"))
    err = capsys.readouterr().err
    assert code == 2 and "holds 'part-notes.parquet', which looks like a part" in err and "--overwrite" not in err
    assert snapshot(tmp_path) == before
    model, opt = setup()
    with pytest.raises(GraftlabError, match="holds 'part-notes.parquet'"):
        Recorder(opt, t, overwrite=bool(overwrite))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("stray", ["copy", "folder"])
def test_record_command_refuses_before_training(tmp_path, capsys, stray):
    t = recorded(tmp_path / "t")
    STRAYS[stray](t)
    before = snapshot(tmp_path)
    metrics = tmp_path / "m.parquet"
    code = run(shlex.split(f"record -o {t} --overwrite --steps 3 --batch-size 2 --device cpu --eval-every 0 "
                           f"--quiet --metrics {metrics}"))
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: --out ") and len(err.strip().splitlines()) == 1, err
    assert "looks like a part of the trace" in err
    assert snapshot(tmp_path) == before and not metrics.exists()  # nothing trained, nothing written


def test_a_users_folder_holding_a_copied_part_is_not_a_trace_folder(tmp_path):
    from graftlab.trace.outputs import check_output, trace_folder_of

    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    (work / "part-000000000000 (1).parquet").write_bytes(b"a copy")
    assert trace_folder_of(work / "run1") is None
    check_output(work / "c.json", "corrections file")  # an output beside the user's files
    model, opt = setup()
    with Recorder(opt, work / "run1", flush_every=2) as rec:
        rec.log(loss=1.0)
    assert (work / "notes.txt").read_text() == "mine" and (work / "part-000000000000 (1).parquet").read_bytes() == b"a copy"
    (work / "part-000000000000.parquet").write_text("a text under a part's name: no part graftlab wrote")
    assert trace_folder_of(work / "run2") is None
    t = recorded(tmp_path / "t")  # a trace graftlab wrote still holds nothing but its own files
    assert trace_folder_of(t / "x.json") == t
    with pytest.raises(GraftlabError, match="inside the trace folder"):
        check_output(t / "c.json", "corrections file")
