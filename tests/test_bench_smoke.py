"""The benchmark scripts under bench/ keep working: each runs at its smallest size (nothing is timed
against a target here; bench/RESULTS.md holds the measured figures)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _script(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _results(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFTLAB_BENCH_RESULTS", str(tmp_path / "results"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "results"
    torch.set_num_threads(threads)  # the scripts pin one thread


def test_layouts_match_named_sizes():
    layouts = _script("layouts")
    shapes = layouts.bert_shapes(**layouts.PRESETS["cpu"])
    assert 24e6 < layouts.numel(shapes) < 28e6 and len(shapes) == 138
    names = [n for n, _ in shapes]
    assert len(set(names)) == len(names) and "encoder.layer.7.attention.self.query.weight" in names


def test_step_cost_quick(_results):
    out = _script("step_cost").main(["--quick", "--pairs", "Adam#SGD", "SGD#AdaGrad"])
    rows = out["timing"]
    assert {(r["pair"], r["granularity"], r["path"]) for r in rows} >= {("SGD#AdaGrad", "layer", "direct")}
    assert all(r["ratio"]["median"] > 0 for r in rows)
    mem = out["memory"][0]
    assert mem["graft_buffers"] == pytest.approx(1.0)  # one parameter-sized buffer, counted exactly
    saved = json.loads((_results / "step_cost.quick.json").read_text())
    assert saved["quick"] and saved["timing"][0]["pair"] == "Adam#SGD"


def test_distill_cost_quick(tmp_path):
    mod = _script("distill_cost")
    out = mod.main(["--quick", "--steps", "600", "--groups", "12", "--window", "100", "--data", str(tmp_path / "data")])
    assert out["rows"] == 600 * 12
    res = out["results"]
    assert res["window_long"]["median"] > 0 and res["schedule"]["max_rss_mb"] > 0
    # the synthetic trace is a valid trace: the library reads it back whole
    from graftlab.trace import read_trace

    df = read_trace(tmp_path / "data" / "synthetic-600x12")
    assert len(df) == 600 * 12 and df["step"].max() == 599 and df["group"].nunique() == 12


def test_distill_synthetic_names_are_bert_large():
    names = _script("distill_cost").group_names(400)
    assert len(names) == len(set(names)) == 400
    assert "encoder.layer.23.output.LayerNorm.bias" in names


@pytest.mark.slow
def test_record_cost_quick():
    row = _script("record_cost").main(["--quick", "--block", "4", "--repeats", "2"])
    assert row["recorded_steps"] == 8 and row["groups"] > 40
    assert row["plain_steps_per_s"] > 0 and row["recorded_steps_per_s"] > 0


@pytest.mark.slow
def test_divergence_check_quick(_results):
    out = _script("divergence_check").main(["--quick", "--block", "3", "--repeats", "2"])
    rows = {r["optimizer"]: r for r in out["results"]}
    assert rows["SGD"]["checked_via"] == "gradient norms" and rows["Adam#SGD"]["checked_via"] == "step norms"
    assert all(r["ratio"]["median"] > 0 and r["check_alone_us"] > 0 for r in rows.values())
    assert (_results / "divergence_check.quick.json").exists()




@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recorded_step_never_syncs_with_the_host(tmp_path):
    """A grafted, recorded training step (forward, backward, Graft.step, Recorder.log) raises under
    torch.cuda.set_sync_debug_mode("error") if anything in it waits for the GPU."""
    from graftlab import Graft
    from graftlab.record.recorder import Recorder

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8)).cuda()
    x, y = torch.randn(16, 32, device="cuda"), torch.randn(16, 8, device="cuda")
    cases = [(torch.optim.Adam, torch.optim.SGD, False), (torch.optim.SGD, torch.optim.Adagrad, False),
             (torch.optim.Adam, torch.optim.SGD, True)]  # fused=True: the compiled passes (Triton)
    for m_cls, d_cls, fused in cases:
        graft = Graft(m_cls(model.parameters(), lr=1e-3), d_cls(model.parameters(), lr=1e-2), names=model, fused=fused)
        rec = Recorder(graft, tmp_path / f"{m_cls.__name__}-{d_cls.__name__}-{fused}", flush_every=1000)

        def step():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            graft.step()
            graft.zero_grad()
            rec.log(loss=loss.detach())

        step()  # the first step allocates state, buffers and the recorder's ring buffer (and compiles)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        rec.close()
        assert rec.rows_flushed == 6


def test_proto_size_reencodes_a_trace(tmp_path):
    path = _script("distill_cost").make_trace(tmp_path / "t", 300, 9)
    out = _script("proto_size").main([str(path)])["variants"]
    sizes = dict(out)
    assert sizes["+ no ratio column"] < sizes["metadata in the first part only"] <= sizes["as written"]


def test_median_engines_quick(_results):
    out = _script("median_engines").main(["--quick"])
    grid = out["graftlab grid (bottleneck)"]
    # against float64 references written without the library (numpy.nanmedian over each window)
    assert grid["max_rel_diff"] == {"windows": 0.0, "filter": 0.0}  # the engine is exact
    assert out["pandas"]["max_rel_diff"] == {"windows": 0.0, "filter": 0.0}


def test_median_filter_reference_is_scipy_medfilt_inside():
    """The benchmark's filter reference agrees with scipy.signal.medfilt wherever the two are
    defined alike: all-finite rows, away from the ends (medfilt pads with zeros), and shrinks its
    window at the ends and skips non-finite ratios as a hand-computed case says."""
    from scipy.signal import medfilt

    engines = _script("median_engines")
    step, code, ratio = engines.data(300, 5)
    ratio = ratio.reshape(300, 5)
    ratio[:, 2][np.isinf(ratio[:, 2])] = 1.0  # groups 0, 1, 3, 4 may keep their infs
    ref = engines.reference_filter(step, code, ratio.reshape(-1), 5, width=51)
    finite = np.isfinite(ratio).all(axis=0)
    assert finite[2]
    for g in np.flatnonzero(finite):
        want = medfilt(ratio[:, g].astype(np.float64), 51)
        np.testing.assert_array_equal(ref[g, 25:-25], want[25:-25])
    x = np.array([5.0, np.inf, 1.0, 4.0, 2.0, 3.0], np.float32)  # one group, width 3
    got = engines.reference_filter(np.arange(6), np.zeros(6, np.int32), x, 1, width=3)[0]
    np.testing.assert_array_equal(got, [5.0, np.nan, 2.5, 2.0, 3.0, 2.5])


def test_bitflip_quick(_results):
    out = _script("bitflip").main(["--quick", "--n", "40"])
    assert out["checksums (as written)"]["altered"] == 0
    assert sum(out["no page checksums"][k] for k in ("error", "same", "altered")) == 40


@pytest.mark.slow
def test_cli_start_quick(_results):
    out = _script("cli_start").main(["--quick", "--repeats", "1"])
    assert out["graftlab info"]["imports_torch"] is False and out["graftlab distill --window 500"]["imports_torch"] is False


@pytest.mark.slow
def test_trace_size_quick(_results):
    out = _script("trace_size").main(["--quick", "--steps", "6", "--repeats", "1"])
    fresh = out["traces"][-1]
    assert fresh["format"] == "graftlab.trace/2" and fresh["rows"] > 6 * 40 and 0 < fresh["bytes_per_row"] < 200
    assert out["read_cost"]["wall"]["/2"]["median"] > 0


@pytest.mark.slow
def test_slice_record_cost_quick(_results):
    res = _script("slice_record_cost").main(["--quick", "--granularities", "vocab", "--row-blocks", "100",
                                              "--every", "5", "--block", "5", "--repeats", "1"])
    rows = {r["every"]: r for r in res["rows"]}
    assert set(rows) == {1, 5} and rows[1]["groups"] > 100  # 2 x 20 row blocks beside the heads
    assert rows[1]["bytes_per_recorded_step"] > 0 and rows[1]["ratio"] > 0


@pytest.mark.slow
def test_foreign_scale_quick(_results, tmp_path):
    out = _script("foreign_scale").main(["--quick", "--repeats", "1", "--data", str(tmp_path / "data")])
    r = out["results"]
    assert {"window_ratio", "schedule_ratio", "info_many", "distill_many", "plot5_many"} <= set(r)
    assert r["schedule"]["max_rss_mb"] > 0 and json.loads((_results / "foreign_scale.quick.json").read_text())
