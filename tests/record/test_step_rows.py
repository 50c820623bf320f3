"""A logged value belongs to the step it was computed for: skipped steps write no row, accumulation
micro-batches average into their step's row, and every part of a trace has one schema."""
from __future__ import annotations

import glob

import numpy as np
import pytest
import torch
from torch import nn

import graftlab

torch.set_num_threads(1)


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(model.parameters(), lr=0.1),
                           names=model)
    return model, graft


def per_step(path, column="loss"):
    return graftlab.read_trace(path).groupby("step")[column].first().to_dict()


def test_a_step_gradscaler_skipped_writes_no_row_and_leaves_the_last_one_alone(tmp_path):
    model, graft = setup()
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    with graftlab.Recorder(graft, tmp_path / "t") as rec:
        for scale in (1.0, float("inf"), 1.0, float("inf"), float("inf"), 1.0):
            loss = model(torch.ones(8, 4)).pow(2).mean() * scale
            scaler.scale(loss).backward()
            scaler.step(graft)
            scaler.update()
            graft.zero_grad()
            rec.log(loss=loss.detach())
            if np.isfinite(scale):
                losses.append(loss.item())
    assert graft.steps == 3
    got = per_step(tmp_path / "t")
    assert list(got) == [0, 1, 2]
    np.testing.assert_allclose(list(got.values()), losses, rtol=1e-6)


def test_a_loss_logged_before_any_step_happened_and_dropped_with_its_gradients(tmp_path):
    model, graft = setup()
    with graftlab.Recorder(graft, tmp_path / "t", flush_every=1) as rec:
        model(torch.ones(2, 4)).sum().backward()
        graft.zero_grad()
        rec.log(loss=5.0)  # its step never ran
        model(torch.ones(2, 4)).sum().backward()
        graft.step()
        graft.zero_grad()
        rec.log(loss=1.0, acc=0.5)
        rec.log(tokens=8)  # more keys for the same step
    df = graftlab.read_trace(tmp_path / "t")
    assert df.step.unique().tolist() == [0]
    assert df.loss.iloc[0] == 1.0 and df.acc.iloc[0] == 0.5 and df.tokens.iloc[0] == 8


def test_accelerate_accumulation_logs_each_step_the_mean_of_its_micro_batches(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    accumulate = 4
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model, graft = setup()
    model, opt = accelerator.prepare(model, graft)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(12)]
    micro = []
    with graftlab.Recorder(opt, tmp_path / "t", flush_every=2) as rec:
        for x, y in data:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            micro.append(loss.item())
            rec.log(loss=loss.detach())
    assert graft.steps == len(data) // accumulate
    expected = np.asarray(micro).reshape(-1, accumulate).mean(1)  # what the HF Trainer logs per step
    np.testing.assert_allclose(list(per_step(tmp_path / "t").values()), expected, rtol=1e-6)


def test_a_plain_accumulation_loop_averages_and_a_skip_does_not_leak_into_the_next_step(tmp_path):
    model, graft = setup()
    values = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0]
    with graftlab.Recorder(graft, tmp_path / "t") as rec:
        for i, v in enumerate(values):
            model(torch.ones(2, 4)).sum().backward()
            if i % 3 == 2:
                graft.step()
                graft.zero_grad()
            rec.log(loss=v)
        model(torch.ones(2, 4)).sum().backward()
        rec.log(loss=99.0)  # a micro-batch whose step is skipped: gradients discarded
        graft.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        graft.step()
        graft.zero_grad()
        rec.log(loss=7.0)
    assert per_step(tmp_path / "t") == {0: 2.0, 1: 20.0, 2: 7.0}


def test_recording_follows_a_model_cast_mid_run(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)  # children without state: a cast mid-run is theirs to follow too
    graft = graftlab.Graft(torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.01),
                           names=model)
    with graftlab.Recorder(graft, tmp_path / "t", flush_every=100) as rec:
        for step in range(4):
            if step == 2:
                model.double()
            x = torch.ones(2, 4, dtype=next(model.parameters()).dtype)
            loss = model(x).pow(2).mean()
            loss.backward()
            graft.step()
            graft.zero_grad()
            rec.log(loss=loss.detach())
    df = graftlab.read_trace(tmp_path / "t")
    assert df.step.unique().tolist() == [0, 1, 2, 3]
    assert np.isfinite(df.ratio).all() and df.loss.notna().all()
    np.testing.assert_allclose(df.ratio, 10.0, rtol=1e-6)
    assert df.attrs["graftlab"]["precision"] == "float64"  # the sidecar says what the rows now are


def test_a_column_first_logged_after_the_first_flush_is_read_by_every_reader(tmp_path):
    pl = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    import pandas as pd
    import pyarrow.dataset as ds

    model, graft = setup()
    path = tmp_path / "t"
    with graftlab.Recorder(graft, path, flush_every=2, grad_every=3) as rec:
        for step in range(8):
            model(torch.ones(2, 4)).sum().backward()
            graft.step()
            graft.zero_grad()
            if step >= 4:
                rec.log(loss=float(step))  # as the HF callback's loss at logging steps
    parts = sorted(glob.glob(str(path / "*.parquet")))
    assert len(parts) == 4
    groups = len(graft.group_names)
    # exactly as the README reads the trace folder
    df = pd.read_parquet(path).assign(ratio=lambda d: d.norm_m / d.norm_d)
    assert df.loss.notna().sum() == 4 * groups and "norm_g" in df
    lf = pl.read_parquet(str(path / "*.parquet")).with_columns(ratio=pl.col("norm_m") / pl.col("norm_d"))
    assert lf["loss"].is_not_null().sum() == 4 * groups
    rel = duckdb.sql(f"select *, norm_m / norm_d as ratio from '{path}/*.parquet'")
    assert duckdb.sql("select count(loss) from rel").fetchall()[0][0] == 4 * groups
    table = ds.dataset(path, format="parquet").to_table()
    assert table.column("loss").null_count == 4 * groups
    ours = graftlab.read_trace(path)
    assert ours.groupby("step").loss.first().dropna().to_dict() == {4: 4.0, 5: 5.0, 6: 6.0, 7: 7.0}
