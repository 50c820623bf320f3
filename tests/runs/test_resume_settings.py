"""What a resumed run may change and what it says: another ``--steps`` (which moves the lr schedule
of the steps already run) is refused unless the schedule gives those steps the same rates; ``train
--resume`` without a checkpoint is refused like ``record``'s; a run resumed from its final
checkpoint trains nothing and says so; the summary of a resumed run labels its speed as this
process's; ``record --every`` longer than the run is refused.

Real ``graftlab record``/``train`` runs of bert/tiny, a few steps each, through ``graftlab.cli.app.run``.
"""
from __future__ import annotations

import pytest

from graftlab import trace
from graftlab.cli.app import run
from graftlab.runs import read_metrics

COMMON = ["--task", "bert", "--size", "tiny", "--batch-size", "2", "--eval-every", "0", "--device", "cpu",
          "--seed", "0", "--checkpoint-dir", "ck", "--checkpoint-every", "3"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("eval_size: 2\n")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run([*argv, "--config", "c.yaml"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _extra(command: str) -> list[str]:
    return ["-o", "t", "--metrics", "m.parquet"] if command == "record" else ["--optimizer", "sgd", "--metrics",
                                                                                "m.parquet"]


@pytest.mark.parametrize("command", ["record", "train"])
def test_resume_with_other_steps_is_refused_when_the_schedule_moves(capsys, tmp_path, command):
    # bert's default schedule decays over the run: 6 and 9 steps give step 1.. other rates
    code, _, err = _cli(capsys, command, *COMMON, *_extra(command), "--steps", "6", "--quiet")
    assert code == 0, err
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = _cli(capsys, command, *COMMON, *_extra(command), "--steps", "9", "--resume", "--quiet")
    assert code == 2 and err.count("\n") == 1, err
    assert "--steps 6" in err and "--steps 9" in err and "checkpoint of step 6 in ck" in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing changed
    # the same steps resume (the run was complete: nothing to train, and it says so)
    code, out, err = _cli(capsys, command, *COMMON, *_extra(command), "--steps", "6", "--resume")
    assert code == 0, err
    assert "the run is already complete at step 6" in err and "0/6" not in err, err
    assert "of this process" not in out and "steps/s" not in out and "nothing" in out, out
    frame, meta = read_metrics("m.parquet")
    assert frame["step"].tolist() == list(range(6)) and meta["steps"] == 6


@pytest.mark.parametrize("command", ["record", "train"])
def test_resume_with_more_steps_of_a_constant_schedule_extends_the_run(capsys, command):
    constant = ["--schedule", "constant", "--warmup", "0"]
    code, _, err = _cli(capsys, command, *COMMON, *_extra(command), *constant, "--steps", "6", "--quiet")
    assert code == 0, err
    code, out, err = _cli(capsys, command, *COMMON, *_extra(command), *constant, "--steps", "9", "--resume")
    assert code == 0, err
    assert "(saved with steps=6) with steps=9: the 'constant' schedule gives the steps already run the same" in err
    assert "of this process" in out and "6..8" in out, out
    frame, meta = read_metrics("m.parquet")
    assert frame["step"].tolist() == list(range(9)) and (frame["lr"] == frame["lr"].iloc[0]).all()
    if command == "record":
        assert trace.trace_extent("t") == (0, 8) and trace.read_metadata("t")["config"]["steps"] == 9
    # a warmup is a fraction of the run: more steps warm up longer, which the steps run did not
    code, _, err = _cli(capsys, command, *COMMON, *_extra(command), "--schedule", "constant", "--warmup", "0.5",
                        "--steps", "12", "--resume", "--quiet")
    assert code == 2 and "--warmup 0.0" in err and "--warmup 0.5" in err, err


def test_train_resume_without_a_checkpoint_is_refused(capsys, tmp_path):
    code, _, err = _cli(capsys, "train", *COMMON, "--optimizer", "sgd", "--steps", "3", "--checkpoint-dir", "ckz",
                        "--resume", "--quiet")
    assert code == 2 and err.count("\n") == 1, err
    assert "--checkpoint-dir 'ckz' holds no complete checkpoint" in err and "--resume" in err, err
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(capsys, "train", *COMMON, "--optimizer", "sgd", "--steps", "3", "--checkpoint-dir", "empty",
                        "--resume", "--quiet")
    assert code == 2 and "holds no complete checkpoint" in err, err
    assert not (tmp_path / "ckz").exists() and list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("steps,every,ok", [(10, 20, False), (10, 11, False), (10, 10, True)])
def test_record_every_longer_than_the_run_is_refused(capsys, tmp_path, steps, every, ok):
    from graftlab.runs import RecordConfig
    from graftlab.errors import GraftlabError

    config = RecordConfig(task="bert", size="tiny", steps=steps, every=every, out=str(tmp_path / "t"))
    if ok:
        config.validate()
        return
    with pytest.raises(GraftlabError, match=f"every={every} is more than steps={steps}"):
        config.validate()
    code, _, err = _cli(capsys, "record", "--task", "bert", "--size", "tiny", "--steps", str(steps), "--every",
                        str(every), "-o", "t")
    assert code == 2 and err.count("\n") == 1 and f"--every {every}" in err and f"--steps {steps}" in err, err
    assert not (tmp_path / "t").exists()
