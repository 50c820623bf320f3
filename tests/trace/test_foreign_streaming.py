"""Foreign tables read in bounded memory: the streamed, pushed-down paths give what the plain
in-memory computation gives (CSV parsed block by block, dictionary-encoded Parquet whose row
groups are skipped by their step statistics, schedules through the streamed grid), and tables of
very many groups go through info and distill quickly."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from graftlab.cli.app import app
from graftlab.distill import analysis
from graftlab.distill.medians import read_grid
from graftlab.distill.pipeline import distill
from graftlab.kinds import classify, classify_names
from graftlab.trace import read_metadata, read_trace, trace_extent, trace_info
from graftlab.trace import tables

NAMES = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
         "bert.encoder.layer.0.attention.self.key.bias", "bert.encoder.layer.1.output.dense.weight",
         "cls.predictions.bias"]


def _frame(steps: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = len(NAMES)
    ratio = rng.lognormal(0, 1, steps * g) * np.tile(10.0 ** np.arange(g), steps)
    ratio[7] = np.inf
    ratio[20] = np.nan
    return pd.DataFrame({"step": np.repeat(np.arange(steps), g), "group": np.tile(NAMES, steps), "ratio": ratio})


def _dict_parquet(df: pd.DataFrame, path, rows_per_group: int):
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.set_column(1, "group", table.column("group").dictionary_encode())
    pq.write_table(table, path, row_group_size=rows_per_group)
    return path


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # several batches and CSV blocks even on a small table: the streamed paths are what is tested
    monkeypatch.setattr(tables, "BATCH_ROWS", 97)
    monkeypatch.setattr(tables, "CSV_BLOCK", 1 << 10)


@pytest.mark.parametrize("kind", ["csv", "parquet", "shuffled-csv", "shuffled-parquet"])
def test_streamed_reads_match_the_in_memory_table(tmp_path, kind):
    df = _frame()
    if kind.startswith("shuffled"):
        df = df.sample(frac=1.0, random_state=1).reset_index(drop=True)
    path = tmp_path / ("t.csv" if kind.endswith("csv") else "t.parquet")
    if kind.endswith("csv"):
        df.to_csv(path, index=False)
    else:
        _dict_parquet(df, path, 5 * 40)
    # the reference: pandas, whole and in memory
    ref = pd.read_csv(path) if kind.endswith("csv") else pd.read_parquet(path)
    ref["group"] = ref["group"].astype(str)
    order = list(pd.unique(ref["group"]))
    assert [g["name"] for g in read_metadata(path)["groups"]] == order
    assert trace_extent(path) == (0, 299)
    info = trace_info(path)
    assert (info["rows"], info["steps"], info["first_step"], info["last_step"]) == (1500, 300, 0, 299)
    for steps in [None, (40, 130), (0, 1), (299, None)]:
        got = read_trace(path, steps=steps)
        lo, hi = steps if steps else (None, None)
        want = ref[(ref["step"] >= (lo or 0)) & (ref["step"] < (hi if hi is not None else 10**9))].copy()
        want["rank"] = want["group"].map({g: i for i, g in enumerate(order)})
        want = want.sort_values(["step", "rank"])
        np.testing.assert_array_equal(got["step"].to_numpy(), want["step"].to_numpy())
        assert list(got["group"].astype(str)) == list(want["group"])
        np.testing.assert_array_equal(got["ratio"].to_numpy(), want["ratio"].to_numpy())
    # the grid the schedule streams into: the same values as the rows put in place by hand
    grid, _ = read_grid(path, steps=(10, None))
    want = ref[ref["step"] >= 10].pivot(index="group", columns="step", values="ratio").reindex(order)
    values = np.array(want.to_numpy(dtype=np.float64))
    values[~np.isfinite(values)] = np.nan
    assert grid.groups == order
    np.testing.assert_array_equal(grid.values, values)


def test_schedule_and_window_match_the_in_memory_medians(tmp_path):
    df = _frame(400)
    paths = [_dict_parquet(df, tmp_path / "t.parquet", 5 * 30), tmp_path / "t.csv"]
    df.to_csv(paths[1], index=False)
    rows = df.assign(step=df["step"].astype(np.int64))
    for path in paths:
        corr = distill(path, window=100, schedule=True, filter=5)
        want = analysis.windowed_medians(analysis.filter_groups(rows, 5), 100)
        for g in NAMES:
            med = want[want["group"] == g]["median"].to_numpy()
            assert corr.source["groups"][g]["median"] == pytest.approx(med[0], rel=1e-12)
        static = distill(path, window=100, start=50)
        ref = analysis.window_medians(rows, 100, 50).set_index("group")["median"]
        for g in NAMES:
            assert static.source["groups"][g]["median"] == pytest.approx(ref[g], rel=1e-12)


def test_row_groups_outside_the_steps_are_not_read(tmp_path):
    path = _dict_parquet(_frame(1000), tmp_path / "t.parquet", 5 * 100)
    table = tables.Table(path)
    frags = list(table.dataset.get_fragments())
    assert sum(1 for f in frags for _ in f.split_by_row_group(table_filter(200, 300))) == 1
    got = pa.Table.from_batches(list(table.batches(["step"], (200, 300))))
    assert got.num_rows == 500 and pa.compute.min(got.column("step")).as_py() == 200
    assert table.step_bounds() == (5000, 0, 999)  # from the footers


def table_filter(lo, hi):
    import pyarrow.dataset as ds

    return (ds.field("step") >= lo) & (ds.field("step") < hi)


def test_fast_kinds_are_the_rules_for_every_name():
    names = [f"{b}[{r}]" for r in range(3) for b in NAMES] + NAMES + [
        "h.3.mlp.c_proj.bias", "layers.3.weight", "layer.3", "layer.3[q]", "blocks.2.downsample.1.weight",
        "Layers.12.self_attn.q_proj.weight", "transformer.h.0.attn.c_attn.weight[k]", "layer.01.attention.self.key.bias",
        "transformer.h.1.attn.c_attn.weight[k head 12]", "transformer.h.1.attn.c_attn.weight[v head 2]",
        "bert.encoder.layer.3.attention.self.query.bias[head 11]", "decoder.weight[rows 100-199]",
        "embeddings.word_embeddings.weight[row 7]", "layer2.0.downsample.1.weight[rows 0-3]", "bn1.weight[2]",
        "ln_1[3]", "ln_12.weight", "ln_1.weight", "downsample.1", "downsample.0", "x[q head 3]"]
    fast = classify_names(names)
    assert all(fast[n] == classify(n) for n in names)


@pytest.mark.parametrize("groups", [20_000])
def test_many_groups_go_through_info_and_distill(tmp_path, groups):
    names = [f"{b}[{r}]" for r in range(groups // len(NAMES)) for b in NAMES]
    steps = 4
    rng = np.random.default_rng(0)
    path = tmp_path / "many.parquet"
    pq.write_table(pa.table({"step": np.repeat(np.arange(steps), groups),
                             "group": pa.array(np.tile(names, steps)).dictionary_encode(),
                             "ratio": rng.lognormal(0, 1, steps * groups)}), path)
    runner = CliRunner()
    t0 = time.perf_counter()
    res = runner.invoke(app, ["info", str(path)], env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    assert f"{groups - 50} more groups not listed" in res.output and len(res.output.splitlines()) < 120
    out = tmp_path / "c.json"
    res = runner.invoke(app, ["distill", str(path), "--window", "2", "-o", str(out)], env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    assert f"{groups - 50} more groups not listed" in res.output
    elapsed = time.perf_counter() - t0
    from graftlab.corrections import load_corrections

    corr = load_corrections(out)
    assert len(corr.multipliers) == groups
    kinds = corr.source["groups"]
    assert kinds["bert.encoder.layer.0.attention.self.query.weight[7]"]["kind"] == "Q"
    assert kinds["bert.encoder.layer.1.output.dense.weight[3]"]["block"] == 1
    assert elapsed < 60  # about 0.1 ms per group; was 1.5 ms of Python per group


def test_a_divergence_in_a_foreign_table_is_found_by_the_streamed_schedule(tmp_path):
    from graftlab.distill import divergence
    from graftlab.errors import GraftlabError

    df = _frame(400)
    df["norm_d"] = 1.0
    df["norm_m"] = np.nan_to_num(df["ratio"].to_numpy(), nan=1.0, posinf=1.0)
    df.loc[(df["step"] == 250) & (df["group"] == NAMES[3]), "norm_d"] = np.inf
    path = _dict_parquet(df.drop(columns="ratio"), tmp_path / "t.parquet", 5 * 30)
    marks = divergence.scan(path)
    assert marks == divergence.find(read_trace(path), foreign=True)
    assert marks.nonfinite_step == 250 and marks.groups == (NAMES[3],)
    with pytest.raises(GraftlabError, match="divergence"):
        distill(path, window=100, schedule=True)
    corr = distill(path, window=100, schedule=True, allow_divergence=True)
    assert corr.source["divergence"]["first"] == 250
