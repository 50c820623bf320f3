"""``graftlab demo --quick``: the whole pipeline end to end, checked on what it writes and prints."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from graftlab.cli.app import app
from graftlab.corrections import load_corrections
from graftlab.demo import DemoConfig, choose_beta, format_table, new_folder
from graftlab.errors import GraftlabError
from graftlab.trace import read_trace


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--quick", "--quiet", "--round", "Dauto", "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "results.csv")
    assert list(table["run"]) == ["Adam#SGD (recorded)", "sgd", "sgd+corrections (static medians)",
                                  "sgd+schedule (per-layer schedule)", "adam"]
    assert table["steps"].tolist() == [40] * 5
    assert table["accuracy"].between(0, 1).all() and (table["loss"] > 0).all()
    # the printed table is the written one
    for r in table.itertuples():
        assert f"| {r.run} |" in res.output and f"{r.loss:.4f}" in res.output
    summary = json.loads((out / "demo.json").read_text())
    assert f"SGD-Adam held-out loss gap: {summary['gap_nats']:.3f} nats" in res.output
    assert "sgd+corrections (static medians): closed" in res.output
    df = read_trace(out / "trace")
    assert df["step"].max() == 39 and summary["window"] == 20
    # beta was chosen from this run: the median of the block groups' medians over the window
    corr = load_corrections(out / "corrections.json")
    assert summary["round"] == f"D{summary['beta']:g}" == corr.source["round"]
    tied = [g for g, d in corr.source["groups"].items() if d["tied"]]
    assert tied and all(corr.multipliers[g] == summary["beta"] for g in tied)
    meds = sorted(d["median"] for d in corr.source["groups"].values() if d["tied"] and not d["flags"])
    ref = pd.Series(meds).median()
    assert summary["beta"] == pytest.approx(ref, rel=0.05)
    # the per-layer schedule: eight 5-step pieces per group, followed with no schedule of the run's own
    sched = load_corrections(out / "corrections-schedule.json")
    assert set(sched.schedule) == set(df["group"]) and not sched.multipliers
    assert all([s for s, _ in pieces] == list(range(0, 40, 5)) for pieces in sched.schedule.values())
    lr = pd.read_parquet(out / "metrics-sgd+schedule.parquet")["lr"].dropna()
    assert (lr == lr.iloc[0]).all()  # constant run schedule: the per-group factors do the scheduling
    assert sorted(p.name for p in (out / "figures").iterdir()) == \
        ["corrections.png", "figure5.png", "figure6.png", "figure7.png", "figure8.png"]
    # never overwrites: the same folder again is an error line and exit code 2
    again = CliRunner().invoke(app, ["demo", "--quick", "--quiet", "--out", str(out)])
    assert again.exit_code != 0 and "exists" in str(again.exception)


def test_new_folder_never_reuses(tmp_path):
    a = new_folder(root=tmp_path)
    b = new_folder(root=tmp_path)
    assert a != b and a.name.startswith("demo-") and b.name.startswith(a.name)
    with pytest.raises(GraftlabError, match="exists"):
        new_folder(a)


def test_choose_beta_two_significant_digits():
    class C:
        source = {"groups": {
            "a": {"tied": True, "flags": "", "median": 4.56},
            "b": {"tied": True, "flags": "", "median": 7.0},
            "c": {"tied": True, "flags": "", "median": 1.0},
            "k": {"tied": True, "flags": "degenerate", "median": 1e5},
            "e": {"tied": False, "flags": "", "median": 0.03},
        }}
    assert choose_beta(C()) == 4.6
    C.source["groups"]["d"] = {"tied": True, "flags": "", "median": 1234.0}
    assert choose_beta(C()) == pytest.approx(5.8)  # median of 1, 4.56, 7, 1234 = 5.78
    assert choose_beta(type("E", (), {"source": {"groups": {}}})()) is None


def test_format_table_marks_divergence():
    t = pd.DataFrame([{"run": "sgd", "optimizer": "sgd", "lr": "0.1", "accuracy": 0.1, "loss": 5.0,
                       "diverged_at": 12.0}, {"run": "adam", "optimizer": "adam", "lr": "0.001",
                                              "accuracy": 0.2, "loss": 4.0, "diverged_at": math.nan}])
    text = format_table(t)
    assert "sgd (diverged at step 12)" in text and "| adam | adam | 0.001 | 0.2000 | 4.0000 |" in text


def test_quick_config_is_small():
    q = DemoConfig.quick()
    assert q.steps <= 60 and q.batch_size <= 8 and q.window <= q.steps and q.round == "none"
    assert DemoConfig.quick(window=10).window == 10


@pytest.mark.parametrize("bad,match", [
    (dict(window=0), "window"), (dict(window=41), "window"), (dict(round="Dabc"), "round 'Dabc'"),
    (dict(steps=3), "at least 4 steps"), (dict(momentum=-1.0), "momentum"), (dict(size="huge"), "size must be one of tiny, small, base"),
    (dict(device="tpu"), "unknown device"),
])
def test_bad_settings_are_refused_before_the_folder_exists(tmp_path, bad, match):
    from graftlab.demo import run_demo

    out = tmp_path / "demo"
    with pytest.raises(GraftlabError, match=match):
        run_demo(DemoConfig.quick(out=str(out), **bad), progress=False, echo=lambda s: None)
    assert not out.exists()


def test_demo_runs_share_the_recording_settings(tmp_path):
    cfg = DemoConfig.quick(momentum=0.9, direction_lr=0.5)
    rec = cfg.record_config(tmp_path)
    sgd = cfg.train_config(tmp_path, "sgd", "sgd", 0.5, cfg.sgd_hparams)
    assert (rec.steps, rec.batch_size, rec.seed, rec.eval_size) == (sgd.steps, sgd.batch_size, sgd.seed, sgd.eval_size)
    assert rec.d_hparams == sgd.hparams == {"momentum": 0.9} and rec.direction_lr == sgd.lr == 0.5
    assert rec.out == str(tmp_path / "trace") and sgd.metrics == str(tmp_path / "metrics-sgd.parquet")
    assert cfg.distill_window == 20 and DemoConfig(steps=10).distill_window == 5


def _results(sgd, corrected, scheduled, adam):
    return pd.DataFrame({"run": ["sgd", "sgd+corrections (static medians)", "sgd+schedule (per-layer schedule)", "adam"],
                         "loss": [sgd, corrected, scheduled, adam]})


def test_gap_closed_in_nats_and_as_a_fraction_only_outside_noise():
    from graftlab.demo import NOISE_NATS, format_gap, gap_closed

    # the README's run: gap 0.844 nats; static medians closed -18%, the schedule 82%
    wide = gap_closed(_results(5.5966, 5.7467, 4.9028, 4.7530))
    assert wide.attrs["gap"] == pytest.approx(0.8436) and wide.attrs["meaningful"]
    assert wide["fraction"].round(2).tolist() == [-0.18, 0.82]
    text = format_gap(_results(5.5966, 5.7467, 4.9028, 4.7530))
    assert "gap: 0.844 nats" in text and "closed -0.150 nats = -18% of the gap" in text and "82%" in text

    small = _results(5.80, 5.79, 5.81, 5.80 - NOISE_NATS / 2)
    closed = gap_closed(small)
    assert not closed.attrs["meaningful"] and closed["fraction"].isna().all()
    assert closed["closed_nats"].tolist() == pytest.approx([0.01, -0.01])
    text = format_gap(small)
    assert "small" in text and "%" not in text and "closed -0.010 nats" in text
