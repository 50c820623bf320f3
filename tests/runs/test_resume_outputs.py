"""What ``--resume`` does to a run's outputs besides the checkpoint: the metrics file is continued
(the same run's rows before the resumed step kept, the new ones appended, another run's file
refused), and the trace says where it starts and how long the run now is.

Real ``graftlab record``/``train`` runs of bert/tiny, a few steps each, through ``graftlab.cli.app.run``.
"""
from __future__ import annotations

import shutil

import pytest

from graftlab import trace
from graftlab.cli.app import run
from graftlab.runs import read_metrics

COMMON = ["--task", "bert", "--size", "tiny", "--batch-size", "2", "--eval-every", "0", "--device", "cpu",
          "--seed", "0", "--quiet", "--checkpoint-dir", "ck", "--checkpoint-every", "3",
          # a longer resumed run keeps the rates of the steps already run only with a constant schedule
          "--schedule", "constant", "--warmup", "0"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("eval_size: 2\n")


def _cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = run([*argv, "--config", "c.yaml"])
    return code, capsys.readouterr().err


def _info(capsys, path: str) -> str:
    capsys.readouterr()
    assert run(["info", path, "--no-groups"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["record", "train"])
def test_resume_continues_the_metrics_file(capsys, command):
    extra = ["-o", "t"] if command == "record" else ["--optimizer", "sgd"]
    code, err = _cli(capsys, command, *COMMON, *extra, "--steps", "6", "--metrics", "m.parquet")
    assert code == 0, err
    first, _ = read_metrics("m.parquet")
    code, err = _cli(capsys, command, *COMMON, *extra, "--steps", "9", "--metrics", "m.parquet", "--resume")
    assert code == 0, err
    frame, meta = read_metrics("m.parquet")
    assert frame["step"].tolist() == list(range(9))  # the first process's 6 rows, then the resumed 3
    assert frame["loss"].iloc[:6].tolist() == first["loss"].tolist()
    assert meta["steps"] == 9 and meta["resumed_at"] == 6 and "interrupted" not in meta
    # the same with --overwrite: the run's own rows are still continued, not dropped
    code, err = _cli(capsys, command, *COMMON, *extra, "--steps", "11", "--metrics", "m.parquet", "--resume",
                     "--overwrite")
    assert code == 0, err
    assert read_metrics("m.parquet")[0]["step"].tolist() == list(range(11))


def test_resume_refuses_another_runs_metrics_file(capsys, tmp_path):
    code, err = _cli(capsys, "train", *COMMON, "--optimizer", "sgd", "--steps", "3", "--metrics", "m.parquet")
    assert code == 0, err
    (tmp_path / "other.parquet").write_bytes((tmp_path / "m.parquet").read_bytes())
    before = (tmp_path / "m.parquet").read_bytes()
    code, err = _cli(capsys, "train", *COMMON, "--optimizer", "adam", "--steps", "6", "--metrics", "m.parquet",
                     "--resume")
    assert code == 2 and err.count("\n") == 1 and "holds another run (--optimizer 'sgd'" in err, err
    assert "--overwrite" in err and (tmp_path / "m.parquet").read_bytes() == before
    # a recording's --resume does not continue a plain run's metrics either
    code, err = _cli(capsys, "record", *COMMON, "-o", "t", "--steps", "6", "--metrics", "other.parquet", "--resume")
    assert code == 2 and "holds the metrics of a plain run" in err, err
    # another seed is another run: its checkpoint is not resumed, whatever --overwrite says of the metrics
    code, err = _cli(capsys, "train", *COMMON, "--optimizer", "sgd", "--seed", "1", "--steps", "4",
                     "--metrics", "m.parquet", "--resume", "--overwrite")
    assert code == 2 and "belongs to another run (seed=0, this run has seed=1)" in err, err
    # its own run continues from its checkpoint, and its metrics file with it
    code, err = _cli(capsys, "train", *COMMON, "--optimizer", "sgd", "--steps", "4",
                     "--metrics", "m.parquet", "--resume", "--overwrite")
    assert code == 0, err
    frame, meta = read_metrics("m.parquet")
    assert meta["config"]["seed"] == 0 and frame["step"].tolist() == [0, 1, 2, 3]


def test_resume_says_where_the_trace_starts_and_extends_its_config(capsys, tmp_path):
    code, err = _cli(capsys, "record", *COMMON, "-o", "t", "--steps", "6")
    assert code == 0, err
    shutil.copytree(tmp_path / "ck", tmp_path / "ck2")
    # into a new trace folder: the trace starts at the checkpoint's step, and the run says so
    code, err = _cli(capsys, "record", *COMMON, "-o", "t2", "--steps", "9", "--resume", "--checkpoint-dir", "ck2")
    assert code == 0, err
    assert "trace t2 starts at step 6: the run resumes from the checkpoint of step 6 in ck2" in err, err
    assert trace.trace_extent("t2") == (6, 8)
    # into the existing trace: it continues at the checkpoint's step
    code, err = _cli(capsys, "record", *COMMON, "-o", "t", "--steps", "9", "--resume")
    assert code == 0, err
    assert "resuming trace t at step 6 (the checkpoint of step 6 in ck)" in err, err
    assert trace.trace_extent("t") == (0, 8)
    assert trace.read_metadata("t")["config"]["steps"] == 9  # the run now goes to 9 steps
    assert '"steps": 9' in " ".join(_info(capsys, "t").split())
