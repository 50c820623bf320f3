"""Reduced experiments (a few steps, one seed, one-point grids): outputs, tables and resumability."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments import batch_transfer, resnet, transformer
from experiments.runner import Settings, markdown, quarter_medians
from graftlab.errors import GraftlabError
from graftlab.runs import read_metrics

torch.set_num_threads(1)


def _quick(out: Path, **kw) -> Settings:
    return Settings(out=str(out), quick=True, **kw)


def _runs(out: Path) -> dict[str, float]:
    return {p.stem: p.stat().st_mtime_ns for p in sorted((out / "runs").glob("*.parquet"))}


def _table_rows(text: str, labels) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] in labels:
            rows.setdefault(cells[0], cells)
    return rows


def test_transformer_quick_and_resume(tmp_path, capsys):
    out = tmp_path / "t"
    transformer.main(settings=_quick(out, steps=4))
    text = (out / "results.md").read_text()
    rows = _table_rows(text, set(transformer.LABELS.values()))
    assert set(rows) == set(transformer.LABELS.values())  # one row per method
    for cells in rows.values():
        assert cells[1] == "1"  # one seed
        float(cells[3].split()[0])  # a held-out loss
    names = _runs(out)
    assert set(names) == {"adam_lr0.001_s0", "sgd_lr0.1_s0", "graft_s0", "sgd_median_s0", "sgd_dbeta_s0",
                          "sgd_global_s0", "sgd_schedule_s0"}
    frame, meta = read_metrics(out / "runs" / "sgd_median_s0.parquet")
    assert len(frame) == 4 and math.isfinite(meta["final"]["loss"])
    assert meta["corrections"]["path"].endswith("median.json")
    for f in ("transformer.png", "drift.csv", "runs.csv", "settings.json"):
        assert (out / f).exists(), f
    for c in ("median", "dbeta", "global", "schedule"):
        assert (out / "corrections" / f"{c}.json").exists()
    # the global factor is the median whole-model ratio: check it against the trace, float64
    from graftlab.trace import read_trace

    df = read_trace(out / "traces" / "graft_s0", steps=(0, 1))
    import numpy as np

    ref = np.sqrt((df["norm_m"].astype("float64") ** 2).sum()) / np.sqrt((df["norm_d"].astype("float64") ** 2).sum())
    glob = transformer.global_factor(out / "traces" / "graft_s0", 1, 0.1).multipliers["global"]
    assert glob == pytest.approx(ref, rel=1e-9)

    capsys.readouterr()
    with pytest.raises(GraftlabError, match="results.md' already exists"):  # a finished experiment's tables
        transformer.main(settings=_quick(out, steps=4))
    assert capsys.readouterr().out == ""
    transformer.main(settings=_quick(out, steps=4, overwrite=True))  # every run is done: all skipped
    log = capsys.readouterr().out
    assert "run   " not in log and log.count("skip  ") == 7
    assert _runs(out) == names


def test_resnet_quick(tmp_path):
    out = tmp_path / "r"
    resnet.main(settings=_quick(out, steps=4, eval_size=32))
    text = (out / "results.md").read_text()
    rows = _table_rows(text, set(resnet.LABELS.values()))
    assert set(rows) == set(resnet.LABELS.values())
    for cells in rows.values():
        acc = float(cells[3].split()[0])
        assert 0.0 <= acc <= 1.0
    assert len(_runs(out)) == 5  # sgd, adagrad (the one-point grids are the baselines), two grafts, scheduled adagrad
    assert (out / "figure4.png").stat().st_size > 0 and (out / "resnet.png").exists()
    sched = resnet_schedule(out)
    assert sched[0][0] == 0 and all(f > 0 for _, f in sched)


def resnet_schedule(out: Path):
    from graftlab.corrections import load_corrections

    return load_corrections(out / "corrections" / "schedule.json").schedule["global"]


def test_batch_transfer_cli_and_interrupted_run(tmp_path):
    from typer.testing import CliRunner

    from graftlab.cli.app import app

    out = tmp_path / "b"
    args = ["experiment", "batch_transfer", "--quick", "--steps", "4", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert set(_runs(out)) == {"bs4_s0", "bs16_s0"}
    med = pd.read_csv(out / "medians.csv")
    assert set(med["batch"]) == {4, 16}
    text = (out / "results.md").read_text()
    assert "x2 (square root)" in text and "| all |" in text
    # an interrupted run: its trace exists but not its metrics file -> recorded again, others skipped
    before = _runs(out)
    os.unlink(out / "runs" / "bs16_s0.parquet")
    res = CliRunner().invoke(app, args)
    assert "already exists; pass --overwrite" in str(res.exception)  # the tables are not rewritten silently
    assert _runs(out) == {"bs4_s0": before["bs4_s0"]}
    res = CliRunner().invoke(app, args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    after = _runs(out)
    assert after["bs4_s0"] == before["bs4_s0"] and after["bs16_s0"] != before["bs16_s0"]
    assert "skip  bs4_s0" in res.output and "run   bs16_s0" in res.output


def test_unknown_experiment_is_one_error_line():
    from typer.testing import CliRunner

    from graftlab.cli.app import app

    res = CliRunner().invoke(app, ["experiment", "nope"])
    assert res.exit_code != 0
    assert "unknown experiment 'nope'" in str(res.exception) or "unknown experiment" in res.output


def test_errors_against_float64_reference():
    frame = pd.DataFrame({"kind": ["Q", "Q", "V"], "group": ["a", "b", "c"],
                          "log10_ratio": [math.log10(2.0), math.log10(4.0), math.log10(1.0)]})
    err = batch_transfer.errors(frame)
    # x2 prediction: |0| + |log10 2| for Q -> mean 0.1505; V: |0 - log10 2|
    assert err.loc["Q", "x2 (square root)"] == pytest.approx(math.log10(2) / 2, rel=1e-12)
    assert err.loc["V", "x1 (no rescaling)"] == pytest.approx(0.0, abs=1e-15)
    assert err.loc["all", "fitted exponent"] == pytest.approx(0.5, rel=1e-12)  # median log10 ratio = log10 2


def test_quarter_medians_and_markdown():
    steps = 8
    df = pd.DataFrame({"step": list(range(8)) * 1, "group": ["g"] * 8,
                       "ratio": [1, 1, 2, 2, 3, 3, 4, float("nan")], "lr": [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5]})
    raw = quarter_medians(df, steps, {"g": "Q"})
    assert raw.loc["Q"].tolist() == [1.0, 2.0, 3.0, 4.0]
    norm = quarter_medians(df, steps, {"g": "Q"}, normalise_lr=True)
    assert norm.loc["Q"].tolist() == [1.0, 2.0, 6.0, 8.0]
    text = markdown(pd.DataFrame({"step": [10, 20], "x": [0.5, float("nan")]}))
    assert text.splitlines()[2] == "| 10 | 0.5000 |" and text.splitlines()[3] == "| 20 | - |"


def test_finished_run_with_other_settings_is_an_error(tmp_path):
    from experiments.runner import _check_same
    from graftlab.errors import GraftlabError
    from graftlab.config import TrainConfig

    stored = {"task": "bert", "steps": 300, "lr": 0.1, "seed": 0}
    _check_same("r", tmp_path / "r.parquet", stored, TrainConfig(task="bert", steps=300, lr=0.1 + 1e-16))
    with pytest.raises(GraftlabError, match="steps=300"):
        _check_same("r", tmp_path / "r.parquet", stored, TrainConfig(task="bert", steps=150, lr=0.1))
