"""Traces from other tools: Parquet (pandas, pyarrow, polars, DuckDB) and CSV tables of step, group, ratio.

The tables hold the real Hugging Face BERT trace of tests/data (see tests/distill/test_degenerate.py) without
any graftlab metadata, so every result can be checked against the same trace read by graftlab.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import graftlab
from graftlab.cli.app import app
from graftlab.trace import foreign
from graftlab.corrections import load_corrections
from graftlab.distill.pipeline import distill
from graftlab.trace import trace_extent
from graftlab.errors import GraftlabError
from graftlab.trace import group_table, read_metadata, read_trace, trace_info

DATA = Path(__file__).resolve().parents[1] / "data"
ROOT = Path(__file__).resolve().parents[2]
HF_BERT = DATA / "hf-bert-2x64"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def original():
    return read_trace(HF_BERT)


@pytest.fixture(scope="module")
def plain(original):
    """The trace as another tool would hold it: plain columns, HF names, no metadata."""
    return pd.DataFrame({"step": original["step"].to_numpy(), "group": original["group"].astype(str).to_numpy(),
                         "ratio": original["ratio"].to_numpy(), "norm_m": original["norm_m"].to_numpy(),
                         "norm_d": original["norm_d"].to_numpy()})


def _pandas(df, p):
    df.to_parquet(p)
    return p


def _pandas_category(df, p):
    df.astype({"group": "category"}).to_parquet(p)
    return p


def _pandas_hive(df, p):
    df.to_parquet(p, partition_cols=["group"])  # a directory group=<name>/...
    return p


def _pyarrow_dictionary(df, p):
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.set_column(1, "group", table.column("group").dictionary_encode())
    pq.write_table(table, p, row_group_size=500)
    return p


def _pyarrow_dataset(df, p):
    # files named part-0.parquet, part-1.parquet, ...: graftlab's part names, but no metadata
    ds.write_dataset(pa.Table.from_pandas(df[::-1].reset_index(drop=True), preserve_index=False), p,
                     format="parquet", max_rows_per_file=1500, max_rows_per_group=700)
    return p


def _polars(df, p):
    pl = pytest.importorskip("polars")
    pl.from_pandas(df).write_parquet(p)
    return p


def _polars_categorical(df, p):
    pl = pytest.importorskip("polars")
    pl.from_pandas(df).with_columns(pl.col("group").cast(pl.Categorical)).write_parquet(p)
    return p


def _duckdb(df, p):
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    con.register("frame", df)
    con.execute(f"COPY (SELECT * FROM frame) TO '{p}' (FORMAT parquet)")
    return p


def _csv(df, p):
    df[["step", "group", "ratio"]].to_csv(p, index=False)  # norms left out; inf/nan as text
    return p


WRITERS = {"pandas.parquet": _pandas, "pandas-category.parquet": _pandas_category, "pandas-hive": _pandas_hive,
           "pyarrow-dict.parquet": _pyarrow_dictionary, "pyarrow-dataset": _pyarrow_dataset,
           "polars.parquet": _polars, "polars-categorical.parquet": _polars_categorical,
           "duckdb.parquet": _duckdb, "trace.csv": _csv}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, original):
    """distill of the graftlab trace, as it decides without gradient norms (which a foreign table lacks)."""
    import shutil

    from graftlab import trace

    old = tmp_path_factory.mktemp("ref") / "t"
    shutil.copytree(HF_BERT, old)
    for part in sorted(old.glob(trace.PART_GLOB)):
        trace.write_table(pq.read_table(part).drop_columns(["norm_g"]), part)
    return distill(old, window=60)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_foreign_table_reads_like_the_trace(tmp_path, writer, plain, original):
    path = WRITERS[writer](plain, tmp_path / writer)
    assert foreign.is_foreign(path)
    df = read_trace(path)
    assert list(df.columns[:5]) == ["step", "group", "ratio", "norm_m", "norm_d"]
    assert (np.diff(df["step"].to_numpy()) >= 0).all()
    names = [g["name"] for g in df.attrs["graftlab"]["groups"]]
    assert list(df["group"][: len(names)]) == names  # step, then group order of first appearance
    if writer in ("pandas-hive", "pyarrow-dataset"):
        # partitions by group (alphabetical) or rows written backwards: first appearance differs
        assert sorted(names) == sorted(pd.unique(original["group"]))
        # by name: read_trace gives a graftlab trace's groups as a categorical in metadata order
        df = df.assign(group=df["group"].astype(str)).sort_values(["step", "group"], kind="stable")
        original = original.assign(group=original["group"].astype(str)).sort_values(["step", "group"], kind="stable")
        df, original = df.reset_index(drop=True), original.reset_index(drop=True)
    else:
        assert names == list(pd.unique(original["group"]))
    np.testing.assert_array_equal(df["step"].to_numpy(), original["step"].to_numpy())
    assert list(df["group"]) == list(original["group"])
    # float32 values, written as float32 or as their shortest decimal text (CSV)
    np.testing.assert_array_equal(df["ratio"].to_numpy().astype(np.float32), original["ratio"].to_numpy())
    if writer.endswith(".csv"):
        assert df["norm_m"].isna().all()  # not in the table: unknown
    else:
        np.testing.assert_array_equal(df["norm_d"].to_numpy(), original["norm_d"].to_numpy().astype(np.float64))
    # kinds, feed-forward positions and blocks: inferred from the names as the recorder found them
    want = group_table(original.attrs["graftlab"])[["kind", "ffn", "block"]]
    got = group_table(df.attrs["graftlab"])[["kind", "ffn", "block"]]
    pd.testing.assert_frame_equal(got.reindex(want.index).astype(object), want.astype(object), check_dtype=False)
    assert trace_extent(path) == (0, 119)
    window = read_trace(path, steps=(10, 20), groups=["bert.embeddings.LayerNorm.bias"])
    assert list(window["step"]) == list(range(10, 20))
    meta = read_metadata(path)
    assert meta["direction"] is None and meta["granularity"] is None
    line = foreign.note(meta)
    assert "\n" not in line and "D's learning rate" in line and "inferred" in line


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_foreign_table_distills_through_the_cli(tmp_path, writer, plain, reference):
    path = WRITERS[writer](plain, tmp_path / writer)
    out = tmp_path / "c.json"
    res = cli("distill", path, "--window", 60, "--round", "D500", "-o", out)
    assert res.exit_code == 0, res.output
    note = [line for line in res.output.splitlines() if line.startswith("no graftlab metadata")]
    assert len(note) == 1 and "D's learning rate" in note[0]
    corr = load_corrections(out)
    assert corr.direction_lr is None and corr.source["metadata"]["foreign"]["format"] in ("parquet", "csv")
    assert set(corr.source["flagged"]) == {f"bert.encoder.layer.{i}.attention.self.key.bias" for i in (0, 1)}
    # D500 ties the groups of the two transformer blocks (blocks inferred from the names)
    for g, d in corr.source["groups"].items():
        assert d["tied"] == (".encoder.layer." in g)
    want = distill(reference.source["trace"], window=60, round="D500")
    assert corr.multipliers == want.multipliers


def test_csv_trace_plots_through_the_command_line(tmp_path, plain):
    path = _csv(plain, tmp_path / "trace.csv")
    res = subprocess.run([sys.executable, "-m", "graftlab", "plot", str(path), "--figure", "5", "-o",
                          str(tmp_path / "f5.png"), "--steps", "60"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "f5.png").stat().st_size > 10_000
    assert [line for line in res.stderr.splitlines() if "no graftlab metadata" in line] == [
        f"{path}: {foreign.note(read_metadata(path))}"]


@pytest.mark.parametrize("writer", ["polars.parquet", "pandas-hive"])
def test_foreign_table_plots_and_infos_through_the_cli(tmp_path, writer, plain):
    path = WRITERS[writer](plain, tmp_path / writer)
    res = cli("plot", path, "--figure", "corrections", "-o", tmp_path / "c.png", "--window", 60)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c.png").stat().st_size > 10_000
    res = cli("info", path)
    assert res.exit_code == 0, res.output
    assert "table (no graftlab metadata)" in res.output
    assert [line for line in res.output.splitlines() if line.startswith("no graftlab metadata")]
    t = trace_info(path)
    assert t["rows"] == len(plain) and t["steps"] == 120 and (t["first_step"], t["last_step"]) == (0, 119)
    assert t["parts"] == (42 if writer == "pandas-hive" else 1)


def test_global_csv_trace_is_a_schedule(tmp_path):
    steps = np.arange(40)
    ratio = np.where(steps < 20, 0.02, 0.05)
    ratio[3] = np.inf
    path = tmp_path / "global.csv"
    pd.DataFrame({"step": steps, "group": "global", "ratio": ratio}).to_csv(path, index=False)
    meta = read_metadata(path)
    assert meta["granularity"] == "global" and "granularity" not in " ".join(meta["foreign"]["unknown"])
    corr = distill(path, window=20)
    assert corr.schedule == {"global": [[0, 0.02], [20, 0.05]]}
    assert corr.source["groups"]["global"]["n_nonfinite"] == 1


def test_csv_with_empty_cells_and_float_steps(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("group,step,ratio,norm_m\na.weight,0,1.5,\na.weight,1,inf,2\nb.bias,0,,1\nb.bias,1,nan,1\n")
    df = read_trace(path)
    assert list(df["group"]) == ["a.weight", "b.bias", "a.weight", "b.bias"]
    assert df["ratio"].iloc[0] == 1.5 and np.isinf(df["ratio"].iloc[2]) and df["ratio"].iloc[1:].isna().sum() == 2
    p = tmp_path / "f.parquet"
    pd.DataFrame({"step": [0.0, 1.0], "group": ["x", "x"], "ratio": [1.0, 2.0]}).to_parquet(p)
    assert read_trace(p)["step"].dtype == np.int64


@pytest.mark.parametrize("text,match", [
    ("step,group\n0,a\n", "missing ratio"),
    ("step,group,ratio\n0.5,a,1\n", "not a readable CSV trace"),
    ("step,group,ratio\n0,a,fast\n", "not a readable CSV trace"),
])
def test_bad_csv_is_one_error_line(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    res = cli("distill", path, "--window", 1, "-o", tmp_path / "c.json")
    assert res.exit_code != 0 and isinstance(res.exception, GraftlabError), res.output
    assert "\n" not in str(res.exception) and match in str(res.exception)
    assert not (tmp_path / "c.json").exists()


def test_bad_parquet_is_one_error_line(tmp_path):
    p = tmp_path / "x.parquet"
    pd.DataFrame({"step": [0.5], "group": ["a"], "ratio": [1.0]}).to_parquet(p)
    with pytest.raises(GraftlabError, match="whole step numbers"):
        read_trace(p)
    with pytest.raises(GraftlabError, match="has no column"):
        read_trace(p, columns=["loss"])
    res = subprocess.run([sys.executable, "-m", "graftlab", "distill", str(p), "--window", "1"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {p}: column step must hold whole step numbers"]


def test_graftlab_traces_are_not_foreign(tmp_path):
    assert not foreign.is_foreign(HF_BERT)
    assert not foreign.is_foreign(next(HF_BERT.glob("part-*.parquet")))
    assert not foreign.is_foreign(tmp_path / "missing")
    assert read_metadata(HF_BERT)["format"] == graftlab.trace.FORMAT_1  # recorded before /2; still read


def test_repeated_pairs_and_negative_steps_name_the_file(tmp_path):
    p = tmp_path / "dup.parquet"
    pd.DataFrame({"step": [0, 0, 1, 1, 1, 2, 2, 2], "group": ["a", "b", "a", "b", "b", "a", "b", "a"],
                  "ratio": np.ones(8)}).to_parquet(p)
    with pytest.raises(GraftlabError, match=rf"^{p}: step 1 of group 'b' appears in more than one row \(2 repeated"):
        read_trace(p)
    with pytest.raises(GraftlabError, match=rf"^{p}: step 1 of group 'b'"):
        distill(p, window=2)
    n = tmp_path / "neg.csv"
    n.write_text("step,group,ratio\n0,a,1\n-3,a,1\n-1,a,1\n1,a,1\n")
    for call in (read_trace, trace_info, trace_extent, lambda q: distill(q, window=1)):
        with pytest.raises(GraftlabError, match=rf"^{n}: step -3 is negative .*2 row\(s\) have a negative step"):
            call(n)
