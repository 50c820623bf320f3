"""Files written whole (corrections, figures, metrics) get ordinary permissions: a new file the
umask's, a replaced file its old mode (not tempfile's 0o600)."""
from __future__ import annotations

import os
import stat

import pytest

from graftlab.io.outputs import write_atomic, write_text

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda m: os.umask(m)
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_a_new_file_gets_0666_less_the_umask(tmp_path, umask, mask):
    umask(mask)
    path = write_text(tmp_path / "c.json", "{}")
    assert mode(path) == 0o666 & ~mask
    assert path.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary left behind


@pytest.mark.parametrize("old", [0o644, 0o640, 0o664, 0o600, 0o444])
def test_a_replaced_file_keeps_its_mode(tmp_path, umask, old):
    umask(0o022)
    path = tmp_path / "m.parquet"
    path.write_bytes(b"old")
    os.chmod(path, old)
    write_atomic(path, lambda tmp: tmp.write_bytes(b"new"), overwrite=True)
    assert path.read_bytes() == b"new" and mode(path) == old


def test_a_writer_that_fails_leaves_the_old_file_and_mode(tmp_path, umask):
    path = tmp_path / "f.png"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old" and mode(path) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_distill_overwrite_keeps_the_corrections_file_mode(tmp_path, umask):
    from typer.testing import CliRunner

    from graftlab.cli.app import app
    from pathlib import Path

    umask(0o002)
    sample = Path(__file__).resolve().parents[2] / "sample_traces" / "bert-adam-sgd-bs16"
    out = tmp_path / "c.json"
    args = ["distill", str(sample), "--window", "500", "-o", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert mode(out) == 0o664
    os.chmod(out, 0o640)
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert mode(out) == 0o640
