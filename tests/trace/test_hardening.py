"""Nothing destroyed before its replacement exists, only graftlab's own names touched, no path
followed out of its folder.

Two families of probes, each a real run of the library on real files (the README's reliability
table counts them: ``pytest tests/trace/test_hardening.py -q`` prints the counts):

- data loss: an old trace (or output file) and a user's files beside it, then a replacement that
  fails in one of many ways; every byte must be as it was (or, where the replacement succeeded,
  the user's files must be);
- security: symbolic links, FIFOs and planted files at the names graftlab writes or reads.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import shutil
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
from graftlab.errors import GraftlabError
from graftlab.io import fsutil
from graftlab.io.outputs import write_text
from graftlab.record.recorder import Recorder
from graftlab.record.target import open_trace
from graftlab.trace import replacing
from graftlab.trace.layout import PART_GLOB, PART_NAME
from graftlab.trace.lock import LOCK_NAME, TraceLock
from graftlab.trace.outputs import check_output
from tests import models, trace_builder

ROOT = Path(__file__).resolve().parents[2]

# names a user keeps beside a trace that the part glob (part-*.parquet) or a loose pattern would match
USER_FILES = ["part-notes.parquet", "part-000000000000 (1).parquet", "part-1.parquet", "part-000000000000.parquet.bak",
              "_graftlab.json~", ".part-000000000000.parquet.swp", "notes.txt", ".hidden"]


def setup(seed: int = 0):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = models.make("block", dtype=torch.float32)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, graftlab.Graft(adam, sgd, names=model)


def run(model, opt, rec, n, seed=1):
    for x, y in models.batches("block", n, dtype=torch.float32, seed=seed):
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: its type, and a regular file's content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            elif os.path.isfile(p):
                out[rel] = hashlib.sha1(Path(p).read_bytes()).hexdigest()
            else:
                out[rel] = f"special:{st.st_mode:o}"
    return out


def old_trace(tmp_path: Path, kind: str) -> Path:
    """A recorded trace of 3 parts: ``plain``, with ``user`` files beside its parts, or a ``/1``
    trace; or of ``one part``."""
    model, opt = setup()
    path = tmp_path / "T"
    with Recorder(opt, path, flush_every=100 if kind == "one part" else 2, flush_seconds=None, model=model) as rec:
        run(model, opt, rec, 6)
    if kind == "/1":  # the same run's rows in the older format (a ratio column, metadata in every part)
        meta = trace.read_metadata(path)
        df = trace.read_trace(path)
        names = [g["name"] for g in meta["groups"]]
        ratios = df.pivot(index="step", columns="group", values="ratio")[names].to_numpy()
        shutil.rmtree(path)
        trace_builder.write_trace(path, meta, np.arange(6), ratios, part_steps=2, fmt=trace.FORMAT_1)
    if kind == "user":
        for name in USER_FILES:
            (path / name).write_text(f"a user's {name}")
    return path


# -------------------------------------------------------------------------------- data loss
FAILURES = ["closed before a step", "error in the first step", "killed before the first part",
            "resume cut back, then closed", "resume at 0 with overwrite, then error", "options that cannot run"]
KINDS = ["plain", "user", "/1", "one part"]


def _fail(mode: str, path: Path) -> None:
    model, opt = setup()
    if mode == "closed before a step":
        Recorder(opt, path, overwrite=True, model=model).close()
    elif mode == "error in the first step":
        with pytest.raises(RuntimeError):
            with Recorder(opt, path, overwrite=True, flush_every=100, flush_seconds=None, model=model) as rec:
                x, y = models.batches("block", 1, dtype=torch.float32)[0]
                (model(x) - y).pow(2).mean().backward()
                raise RuntimeError("out of memory in the first step")
    elif mode == "killed before the first part":
        code = textwrap.dedent(f"""
            import os, sys, torch, graftlab
            sys.path.insert(0, {str(ROOT)!r})
            from tests.trace.test_hardening import setup, run
            from graftlab.record.recorder import Recorder
            model, opt = setup()
            rec = Recorder(opt, {str(path)!r}, overwrite=True, flush_every=100, flush_seconds=None, model=model)
            run(model, opt, rec, 3)
            print("ready", flush=True)
            os.kill(os.getpid(), 9)
        """)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "ready" in res.stdout, res.stderr
        assert (path / replacing.BACKUP).is_dir()  # the old files wait aside
        with pytest.raises(RuntimeError):  # the next writer puts them back first, then fails too
            with Recorder(opt, path, overwrite=True, flush_every=100, flush_seconds=None, model=model) as rec:
                raise RuntimeError("fails again")
    elif mode == "resume cut back, then closed":
        opt._steps = 2  # a run resuming at step 2: parts from step 2 on are cut
        with contextlib.suppress(GraftlabError):  # refused (a user's part-like file) or cut and put back
            Recorder(opt, path, resume=True, model=model).close()
    elif mode == "resume at 0 with overwrite, then error":
        with pytest.raises((RuntimeError, GraftlabError)):
            with Recorder(opt, path, resume=True, overwrite=True, model=model):
                raise RuntimeError("diverged at once")
    elif mode == "options that cannot run":
        with pytest.raises(GraftlabError, match="flush_every"):
            Recorder(opt, path, overwrite=True, flush_every=10**11, model=model)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.slow) if "killed" in m else m for m in FAILURES])
def test_a_failed_replacement_leaves_every_byte(tmp_path, mode, kind):
    path = old_trace(tmp_path, kind)
    before = tree(tmp_path)
    if kind == "user" and mode in ("closed before a step", "error in the first step", "killed before the first part"):
        model, opt = setup()  # the user's part-like files stop the recording before it starts
        with pytest.raises(GraftlabError, match="looks like a part of the trace"):
            Recorder(opt, path, overwrite=True, model=model)
    else:
        _fail(mode, path)
    after = tree(tmp_path)
    if "killed" in mode:  # a SIGKILLed writer's hidden lock file (its pid, no data) stays: trace/lock.py
        after.pop(f"T/{LOCK_NAME}", None)
        before.pop(f"T/{LOCK_NAME}", None)
    assert after == before


@pytest.mark.parametrize("kind", ["plain", "/1"])
@pytest.mark.parametrize("name", USER_FILES)
def test_overwrite_deletes_only_graftlabs_own_names(tmp_path, name, kind):
    path = old_trace(tmp_path, kind)
    (path / name).write_text("mine")
    model, opt = setup()
    if fnmatch.fnmatchcase(name, PART_GLOB):  # a reader would take it for a part: refused before any change
        before = tree(tmp_path)
        with pytest.raises(GraftlabError, match=f"holds '{re.escape(name)}', which looks like a part"):
            Recorder(opt, path, overwrite=True, model=model)
        assert tree(tmp_path) == before
        return
    with Recorder(opt, path, overwrite=True, flush_every=2, flush_seconds=None, model=model) as rec:
        run(model, opt, rec, 4, seed=5)
    assert (path / name).read_text() == "mine"
    assert not (path / replacing.BACKUP).exists()  # the old files went once the first new part was durable
    assert [p.name for p in trace.part_files(path) if PART_NAME.fullmatch(p.name)] == [
        "part-000000000000.parquet", "part-000000000002.parquet"]


def test_the_backup_goes_only_after_the_first_new_part_is_durable(tmp_path):
    path = old_trace(tmp_path, "plain")
    model, opt = setup()
    seen = []
    rec = Recorder(opt, path, overwrite=True, flush_every=2, flush_seconds=None, model=model,
                   on_flush=lambda table, meta: seen.append((path / replacing.BACKUP).exists()))
    assert (path / replacing.BACKUP).is_dir() and not trace.part_files(path)
    run(model, opt, rec, 2)
    rec.sync()
    rec.close()
    assert seen == [False]


WRITERS = ["atomic_write", "write_text", "write_part"]
WRITE_FAILURES = ["raises", "killed (SIGKILL)", "target replaced meanwhile"]


@pytest.mark.parametrize("fail", WRITE_FAILURES)
@pytest.mark.parametrize("writer", WRITERS)
def test_a_failed_file_write_leaves_the_old_file_and_no_temporary(tmp_path, writer, fail):
    target = tmp_path / ("part-000000000000.parquet" if writer == "write_part" else "out.json")
    target.write_text("old")
    before = tree(tmp_path)
    if fail == "raises":
        with pytest.raises(RuntimeError):
            with fsutil.atomic_path(target) as tmp:
                tmp.write_text("half")
                raise RuntimeError("disk gone")
    elif fail == "killed (SIGKILL)":
        code = (f"import sys, os; sys.path.insert(0, {str(ROOT)!r}); from graftlab.io import fsutil\n"
                f"cm = fsutil.atomic_path({str(target)!r}); tmp = cm.__enter__(); tmp.write_text('half'); "
                "os.kill(os.getpid(), 9)")
        subprocess.run([sys.executable, "-c", code], timeout=60)
        assert len(list(tmp_path.iterdir())) == 2  # the killed writer's temporary is there
        # the next writer of that file removes it (its flock died with the process)
        if writer == "write_text":
            write_text(target, "old")
        else:
            fsutil.atomic_write(target, "old")
    else:
        with pytest.raises(GraftlabError, match="already exists"):
            write_text(target, "new", overwrite=False)
    assert tree(tmp_path) == before


def test_random_sigkills_during_writes_leave_whole_files_and_no_temporaries(tmp_path):
    """10 kills at random moments of a loop of durable writes: the file is always one whole
    version, and the next write removes every temporary the killed process left."""
    target = tmp_path / "c.json"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from graftlab.io import fsutil\n"
            f"i = 0\nwhile True:\n    fsutil.atomic_write({str(target)!r}, f'{{i:08d}}' * 12500); i += 1\n")
    rng = np.random.default_rng(0)
    for _ in range(10):
        p = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(0.4 + float(rng.uniform(0, 0.3)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        text = target.read_text()
        assert len(text) == 100000 and text == text[:8] * 12500  # one whole version
        fsutil.atomic_write(target, text)
        assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


# -------------------------------------------------------------------------------- security
def test_lock_file_symlink_is_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    d = tmp_path / "t"
    d.mkdir()
    (d / LOCK_NAME).symlink_to(victim)
    with pytest.raises(GraftlabError, match="symbolic link"):
        TraceLock(d).acquire()
    assert victim.read_text() == "precious"


def test_lock_file_fifo_is_not_waited_on(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    os.mkfifo(d / LOCK_NAME)
    with pytest.raises(GraftlabError, match="not a regular file"):
        TraceLock(d).acquire()


def test_temporary_names_are_random_and_never_follow_links(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "c.json"
    (tmp_path / ".c.json.tmp").symlink_to(victim)  # the fixed name earlier versions wrote through
    (tmp_path / f".c.json.{'0' * 16}.tmp").symlink_to(victim)  # one in the pattern: a link is no temporary
    fsutil.atomic_write(out, "new")
    write_text(out, "newer")
    assert victim.read_text() == "precious" and out.read_text() == "newer"
    assert fsutil.temporary_name(out) != fsutil.temporary_name(out)


def test_a_planted_temporary_at_a_trace_name_is_not_written_through(tmp_path):
    path = old_trace(tmp_path, "plain")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (path / f".{trace.SIDECAR}.tmp").symlink_to(victim)
    model, opt = setup()
    opt._steps = 6
    with Recorder(opt, path, resume=True, flush_every=2, flush_seconds=None, model=model) as rec:
        run(model, opt, rec, 2)
    assert victim.read_text() == "precious"


def test_the_loser_of_a_record_race_keeps_the_winners_lock(tmp_path):
    path = tmp_path / "new"
    winner = TraceLock(path).acquire()
    inode = os.stat(path / LOCK_NAME).st_ino
    model, opt = setup()
    with pytest.raises(GraftlabError, match="being written by another process"):
        Recorder(opt, path, model=model)
    assert os.stat(path / LOCK_NAME).st_ino == inode  # the winner's lock file, not unlinked
    with pytest.raises(GraftlabError, match="being written by another process"):  # a third writer waits too
        TraceLock(path).acquire()
    winner.release()


def test_a_backup_name_that_is_a_link_is_refused(tmp_path):
    path = old_trace(tmp_path, "plain")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (path / replacing.BACKUP).symlink_to(elsewhere)
    before = tree(tmp_path)
    model, opt = setup()
    with pytest.raises(GraftlabError, match="not a folder graftlab made"):
        Recorder(opt, path, overwrite=True, model=model)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", ["part-000000000100.parquet", trace.SIDECAR])
def test_a_fifo_named_like_a_trace_file_is_refused_without_waiting(tmp_path, name):
    path = old_trace(tmp_path, "plain")
    if name == trace.SIDECAR:
        (path / name).unlink()
    os.mkfifo(path / name)
    signal.alarm(20)  # a hang fails the test instead of stalling the suite
    try:
        with pytest.raises(GraftlabError, match="FIFO"):
            trace.read_trace(path)
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("what", ["/dev/null", "fifo", "dangling link", "link loop", "link to a file", "NUL byte",
                                  "name too long"])
def test_outputs_that_are_not_plain_paths_are_refused(tmp_path, what):
    target = tmp_path / "out.json"
    if what == "/dev/null":
        target = Path("/dev/null")
    elif what == "fifo":
        os.mkfifo(target)
    elif what == "dangling link":
        target.symlink_to(tmp_path / "nowhere")
    elif what == "link loop":
        target.symlink_to(target)
    elif what == "link to a file":
        (tmp_path / "real.json").write_text("keep")
        target.symlink_to(tmp_path / "real.json")
    elif what == "NUL byte":
        target = tmp_path / "out\x00.json"
    else:
        target = tmp_path / ("x" * 300 + ".json")
    before = tree(tmp_path)
    with pytest.raises(GraftlabError):
        check_output(target, "corrections file", overwrite=True)
    assert tree(tmp_path) == before


def test_replacing_a_device_is_refused_by_the_writer_itself(tmp_path):
    with pytest.raises(GraftlabError, match="a device"):
        fsutil.replace_durably(tmp_path / "x", "/dev/null")


def test_counts():
    """The figures of the README's reliability table (data loss and security rows)."""
    loss = len(FAILURES) * len(KINDS) + len(USER_FILES) * 2 + 1 + len(WRITERS) * len(WRITE_FAILURES) + 10
    security = 1 + 1 + 1 + 1 + 1 + 1 + 2 + 7 + 1
    print(f"\ndata-loss probes in this file: {loss}; security probes: {security}")


def test_a_trace_output_that_is_a_symbolic_link_is_refused_and_its_target_kept(tmp_path):
    """``-o link --overwrite`` with ``link -> t``: replacing through the link would replace ``t``."""
    import torch

    from graftlab import Graft, Recorder, read_trace

    model = torch.nn.Linear(3, 2)
    graft = Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1), names=model)
    with Recorder(graft, tmp_path / "t") as rec:
        for _ in range(4):
            model(torch.ones(1, 3)).sum().backward()
            graft.step()
            graft.zero_grad()
    before = read_trace(tmp_path / "t")
    (tmp_path / "link").symlink_to(tmp_path / "t", target_is_directory=True)
    with pytest.raises(GraftlabError, match="symbolic link"):
        Recorder(graft, tmp_path / "link", overwrite=True)
    assert read_trace(tmp_path / "t").equals(before)
    assert rec.path == tmp_path / "t"


def test_check_output_refuses_a_link_for_a_trace_or_an_overwrite_and_allows_one_only_added_to(tmp_path):
    from graftlab.trace.outputs import check_output

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    for kwargs in ({"trace": True, "folder": True, "may_exist": True}, {"folder": True, "overwrite": True}):
        with pytest.raises(GraftlabError, match="symbolic link"):
            check_output(tmp_path / "link", "output", **kwargs)
    assert check_output(tmp_path / "link", "output", folder=True) == tmp_path / "link"
