"""Reduced experiments (a few steps, one seed, one-point grids): outputs, tables and resumability."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from experiments import batch_transfer, resnet, transformer
from experiments.runner import Job, Run, Settings, markdown, quarter_medians, read_metrics
from experiments.stats import gap_closed, half_decade, paired, tune
from graftlab.errors import GraftlabError

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
                          "sgd_dbeta_attn_s0", "sgd_dbeta_qk_s0", "sgd_global_s0", "sgd_schedule_s0"}
    frame, meta = read_metrics(out / "runs" / "sgd_median_s0.parquet")
    assert len(frame) == 4 and math.isfinite(meta["final"]["loss"])
    assert meta["corrections"]["path"].endswith("median.json")
    for f in ("transformer.png", "drift.csv", "runs.csv", "settings.json"):
        assert (out / f).exists(), f
    for c in ("median", "dbeta", "dbeta_attn", "dbeta_qk", "global", "schedule"):
        assert (out / "corrections" / f"{c}.json").exists()
    from graftlab.corrections import load_corrections

    assert load_corrections(out / "corrections" / "dbeta_attn.json").source["round"].startswith("DA")
    qk = load_corrections(out / "corrections" / "dbeta_qk.json")
    tied = [g for g, v in qk.source["groups"].items() if v["tied"]]
    assert tied and all(g.endswith(("attn.query.weight", "attn.key.weight")) for g in tied)
    assert "## D_beta: the paper's rule against attention-only tying" in text and "## lr grids (seed 0)" in text
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
    assert "run   " not in log and log.count("skip  ") == 9
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

    from cli.app import app

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


def test_unknown_experiment_is_one_error_line(capsys):
    from graftlab.cli.app import run

    assert run(["experiment", "nope"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and "unknown experiment 'nope'" in lines[0]
    assert "Traceback" not in captured.err + captured.out


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
    from graftlab.runs import TrainConfig

    stored = {"task": "bert", "steps": 300, "lr": 0.1, "seed": 0}
    _check_same("r", tmp_path / "r.parquet", stored, TrainConfig(task="bert", steps=300, lr=0.1 + 1e-16))
    with pytest.raises(GraftlabError, match="steps=300"):
        _check_same("r", tmp_path / "r.parquet", stored, TrainConfig(task="bert", steps=150, lr=0.1))


# --- grids, paired statistics, the GPU preset ---------------------------------------------------------

class _FakeExperiment:
    """Stands in for Experiment in tune(): a run's final loss is a parabola in log10(lr)."""

    def __init__(self, best_lr: float, diverge_above: float = math.inf):
        self.best, self.diverge_above, self.asked = best_lr, diverge_above, []

    def batch(self, jobs):
        out = []
        for job in jobs:
            lr = job.config
            self.asked.append(lr)
            loss = (math.log10(lr) - math.log10(self.best)) ** 2 + 1.0
            diverged = lr > self.diverge_above
            out.append(Run(job.name, pd.DataFrame(), {"final": {"loss": math.nan if diverged else loss},
                                                      "diverged_at": 3 if diverged else None}, False))
        return out


def _tune(fake, ks):
    return tune(fake, ks, lambda lr: Job(f"lr{lr:g}", lr), lambda r: r.final["loss"])


def test_half_decade_grid():
    assert [half_decade(k) for k in range(-4, 1)] == [0.01, 0.0316, 0.1, 0.316, 1.0]
    assert half_decade(-7) == 0.000316


def test_tune_extends_until_the_best_is_interior():
    fake = _FakeExperiment(best_lr=3e-2)
    lr, table = _tune(fake, range(-8, -3))  # 1e-4 .. 1e-2: best at the upper edge
    assert lr == 0.0316 and len(table) == 7  # extended twice: 0.0316 is then interior
    assert table["chosen"].tolist().count("chosen") == 1 and table.iloc[-2]["lr"] == 0.0316
    # a diverged point beyond the best one makes it interior: no extension
    fake = _FakeExperiment(best_lr=10.0, diverge_above=1.5)
    lr, table = _tune(fake, range(-4, 1))  # 0.01 .. 1
    assert lr == 1.0 and len(table) == 6 and table.iloc[-1]["diverged"] == "yes"
    assert table.iloc[-2]["chosen"] == "chosen"
    # extensions stop after three: the best stays at the edge and says so
    fake = _FakeExperiment(best_lr=1e-9)
    lr, table = _tune(fake, range(-4, 1))
    assert len(table) == 8 and lr == half_decade(-7) and table.iloc[0]["chosen"] == "chosen (edge)"
    # interior from the start: the grid is run once, unchanged
    fake = _FakeExperiment(best_lr=0.1)
    lr, table = _tune(fake, range(-4, 1))
    assert lr == 0.1 and len(table) == 5 and len(fake.asked) == 5


def test_paired_against_float64_reference():
    a, b = [5.80, 5.85, 5.78], [5.75, 5.76, 5.70]
    d = np.array(a, dtype=np.float64) - np.array(b, dtype=np.float64)
    p = paired(a, b)
    assert p["mean"] == pytest.approx(d.mean(), rel=1e-12) and p["std"] == pytest.approx(d.std(ddof=1), rel=1e-12)
    assert p["ci"] == pytest.approx(4.302652729749464 * d.std(ddof=1) / math.sqrt(3), rel=1e-9)  # t(0.975, 2)
    assert p["significant"] and p["n"] == 3
    q = paired([1.0, 2.0, 3.0], [1.5, 1.0, 3.1])  # mean 0.133, spread 0.76: within noise
    assert not q["significant"]
    assert paired([math.nan, 1.0], [0.0, 0.5])["n"] == 1  # diverged seeds are left out
    stats = {"sgd": {"adam": paired([5.9, 5.92, 5.91], [5.8, 5.81, 5.80])},
             "m": {"sgd": paired([5.85, 5.87, 5.86], [5.9, 5.92, 5.91])}}
    assert gap_closed(stats, "m", "adam", "sgd") == "47%"  # 0.05 / 0.10667
    stats["sgd"]["adam"] = q
    assert gap_closed(stats, "m", "adam", "sgd") == "gap within noise"


def test_gpu_preset_values_and_overrides():
    from graftlab.errors import GraftlabError

    s = transformer.resolve(Settings(preset="gpu"))
    assert (s.task, s.size, s.device, s.steps, s.batch_size, s.seeds, s.jobs) == ("gpt", "base", "cuda", 1000, 32, 3, 10)
    s = transformer.resolve(Settings(preset="gpu", device="cpu", steps=5, jobs=2))
    assert (s.device, s.steps, s.jobs, s.size) == ("cpu", 5, 2, "base")
    with pytest.raises(GraftlabError, match="unknown preset"):
        transformer.resolve(Settings(preset="tpu"))
    with pytest.raises(GraftlabError, match="unknown task"):
        transformer.defaults(Settings(task="resnet"))
    if not torch.cuda.is_available():
        from typer.testing import CliRunner

        from cli.app import app

        res = CliRunner().invoke(app, ["experiment", "transformer", "--preset", "gpu", "--out", "/nonexistent/x"])
        assert res.exit_code != 0 and "no CUDA GPU" in (str(res.exception) + res.output)
        assert isinstance(res.exception, GraftlabError)  # the CLI's entry point prints it as one error line


@pytest.mark.slow
def test_gpu_preset_reduced_on_cpu(tmp_path):
    """The whole GPU protocol (5-point grids, Adam#SGD traces, five corrections, paired tables) with
    runs in two worker processes, at a size a CPU runs in about a minute."""
    out = tmp_path / "g"
    settings = Settings(out=str(out), preset="gpu", device="cpu", size="tiny", steps=4, batch_size=4,
                        eval_size=8, seeds=2, jobs=2)
    transformer.main(settings=settings)
    info = __import__("json").loads((out / "settings.json").read_text())
    assert (info["task"], info["size"], info["jobs"], info["preset"]) == ("gpt", "tiny", 2, "gpu")
    grids = pd.read_csv(out / "grids.csv")
    for opt in ("Adam", "SGD+momentum"):
        assert (grids["optimizer"] == opt).sum() >= 5
        lrs = np.sort(grids.loc[grids["optimizer"] == opt, "lr"].to_numpy())
        assert np.allclose(lrs[1:] / lrs[:-1], math.sqrt(10), rtol=0.01)
    runs = _runs(out)
    for m in ("adam", "sgd"):
        assert sum(n.startswith(f"{m}_lr") and n.endswith("_s1") for n in runs) == 1
    for m in transformer.CORRECTIONS:
        assert {f"sgd_{m}_s0", f"sgd_{m}_s1"} <= set(runs)
    assert {"graft_s0", "graft_s1"} <= set(runs)
    frame, meta = read_metrics(out / "runs" / "graft_s1.parquet")
    assert meta["task"]["task"] == "gpt" and len(frame) == 4
    text = (out / "results.md").read_text()
    rows = _table_rows(text, set(transformer.LABELS.values()))
    assert set(rows) == set(transformer.LABELS.values()) and all(c[1] == "2" for c in rows.values())
    assert "[±" in rows[transformer.LABELS["graft"]][5]  # a paired difference with its interval


def test_batch_transfer_figure_tells_overlapping_q_and_k_apart():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from experiments.batch_transfer import transfer_figure

    wide = pd.DataFrame({"seed": [0, 0, 0], "group": ["q.weight", "k.weight", "v.weight"], "kind": ["Q", "K", "V"],
                         16: [600.0, 600.0, 2.7], 64: [950.0, 950.0, 3.6]})
    fig = transfer_figure(wide, 16, 64, "bert/small")
    ax = fig.axes[0]
    assert ax.get_title() == "bert/small: first-quarter medians, batch 16 vs 64"
    q, k = ax.collections[0], ax.collections[1]  # drawn in the figures' kind order: Q, K, V
    # the same point, told apart: K is an open marker of another shape over Q's filled one
    assert (q.get_offsets() == k.get_offsets()).all()
    qv, kv = q.get_paths()[0].vertices, k.get_paths()[0].vertices
    assert qv.shape != kv.shape or not np.allclose(qv, kv)  # circle and triangle
    assert q.get_facecolor()[0][3] > 0
    assert k.get_facecolor().size == 0 or k.get_facecolor()[0][3] == 0  # open
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:3] == ["self-attention Q", "self-attention K", "self-attention V"]
    assert labels[3:] == ["x1 (no rescaling)", "x2 (square root)", "x4 (linear)"]
    plt.close(fig)


# --- the batch-256 regime: presets and the per-layer schedule on some groups only ------------------------

def test_cpu_presets_and_plans():
    s = transformer.resolve(Settings(preset="cpu256"))
    assert (s.task, s.size, s.batch_size, s.steps, s.seeds, s.jobs, s.threads) == ("gpt", "tiny", 256, 300, 3, 2, 1)
    p = transformer.defaults(s)
    assert p["ablations"] == list(transformer.ABLATIONS) and p["corrections"] == transformer.CORRECTIONS
    assert p["adam_ks"] == [-6, -5, -4, -3] and p["sgd_ks"] == [-3, -2, -1, 0]
    p16 = transformer.defaults(transformer.resolve(Settings(preset="cpu16", steps=7)))
    assert p16["batch_size"] == 16 and p16["steps"] == 7 and p16["corrections"] == ["schedule"] and not p16["ablations"]
    assert transformer.defaults(transformer.resolve(Settings(preset="gpu")))["ablations"] == []


def test_subset_schedule_keeps_the_chosen_kinds_and_gives_the_rest_plain_sgd():
    from graftlab.distill import distill
    from graftlab.trace import read_metadata, read_trace

    trace = Path(__file__).resolve().parents[2] / "sample_traces" / "bert-adam-sgd-bs16"
    sched = distill(trace, window=250, schedule=True, round="none")
    steps = 2000
    peak = float(read_metadata(trace)["config"]["magnitude_lr"])
    lr = read_trace(trace, columns=["step", "lr"]).groupby("step")["lr"].first()
    for kinds, chosen in ((("Q", "K"), lambda k: k in ("Q", "K")), (("-output",), lambda k: k != "output")):
        sub = transformer.subset_schedule(sched, trace, kinds, steps)
        assert set(sub.schedule) == set(sched.schedule) and not sub.multipliers
        for g, pieces in sub.schedule.items():
            if chosen(sched.kind(g)):
                assert pieces == sched.schedule[g] and g in sub.source["corrected_groups"]
            else:  # plain SGD's own schedule, one piece per step
                assert [s for s, _ in pieces] == list(range(steps))
                assert [f for _, f in pieces] == pytest.approx((lr.to_numpy()[:steps] / peak).tolist())
    with pytest.raises(GraftlabError, match="no group of kind"):
        transformer.subset_schedule(sched, trace, ("nothing",), steps)
