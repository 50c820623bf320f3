"""A recorded graftlab.trace/2 trace taken out of graftlab: exported by pandas, polars, DuckDB or as
CSV (norms stored, no ratio column, no metadata), or one part file copied out of its directory
(the footer's marker, no _graftlab.json beside it). info, distill and plot read them all."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import graftlab
from graftlab import trace
from graftlab.trace import foreign
from graftlab.cli.app import app
from graftlab.corrections import load_corrections
from graftlab.errors import GraftlabError
from graftlab.record.recorder import Recorder
from graftlab.trace import read_metadata, read_trace, trace_info
from graftlab.trace.scanning import scan_ratios
from tests import models

runner = CliRunner()
STEPS, FLUSH = 48, 16


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _flat(text):
    """A rich table's text without its borders and wrapping."""
    return re.sub(r"[\s│]", "", text)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A real recorder run: /2, three parts, lr, loss and norm_g columns."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = models.make("block", dtype=torch.float32)
    opt = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2),
                         torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), names=model)
    path = tmp_path_factory.mktemp("rec") / "t"
    with Recorder(opt, path, flush_every=FLUSH, model=model, grad_every=2) as rec:
        for x, y in models.batches("block", STEPS, dtype=torch.float32):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss.detach())
    assert read_metadata(path)["format"] == trace.FORMAT and len(rec.parts) == STEPS // FLUSH
    assert "ratio" not in pq.read_schema(rec.parts[0]).names
    return path


def _pandas(src, p):
    import pandas as pd

    pd.read_parquet(src).to_parquet(p)


def _polars(src, p):
    pl = pytest.importorskip("polars")
    pl.read_parquet(f"{src}/*.parquet").write_parquet(p)


def _duckdb(src, p):
    duckdb = pytest.importorskip("duckdb")
    duckdb.connect().execute(f"COPY (SELECT * FROM '{src}/*.parquet') TO '{p}' (FORMAT parquet)")


def _csv(src, p):
    import pandas as pd

    pd.read_parquet(src).to_csv(p, index=False)


EXPORTS = {"pandas.parquet": _pandas, "polars.parquet": _polars, "duckdb.parquet": _duckdb, "pandas.csv": _csv}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_an_exported_trace_without_ratio_reads_distills_plots_and_infos(tmp_path, recorded, name):
    path = tmp_path / name
    EXPORTS[name](recorded, path)
    original = read_trace(recorded)
    df = read_trace(path)
    assert "ratio" not in (pq.read_schema(path).names if name.endswith(".parquet") else [])
    np.testing.assert_array_equal(df["step"].to_numpy(), original["step"].to_numpy())
    assert list(df["group"]) == list(original["group"].astype(str))
    if name.endswith(".parquet"):  # float32 norms: the float32 quotient, bit for bit
        np.testing.assert_array_equal(df["ratio"].to_numpy().astype(np.float32), original["ratio"].to_numpy())
        assert df["ratio"].to_numpy().astype(np.float32).astype(np.float64).tolist() == df["ratio"].tolist()
    else:  # CSV text parsed as float64: the float64 quotient of the same values
        np.testing.assert_allclose(df["ratio"].to_numpy(), original["ratio"].to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(df["loss"].to_numpy(), original["loss"].to_numpy())
    meta = read_metadata(path)
    line = foreign.note(meta)
    assert "\n" not in line and "ratio computed as norm_m / norm_d" in line and "no graftlab metadata" in line

    out = tmp_path / "c.json"
    res = cli("distill", path, "--window", 20, "-o", out)
    assert res.exit_code == 0, res.output
    assert [ln for ln in res.output.splitlines() if "ratio computed as norm_m / norm_d" in ln]
    corr = load_corrections(out)
    want = graftlab.distill.distill(recorded, window=20)
    assert set(corr.multipliers) == set(want.multipliers)
    for g, m in want.multipliers.items():
        assert corr.multipliers[g] == pytest.approx(m, rel=1e-6), g

    res = cli("info", path)
    assert res.exit_code == 0, res.output
    assert "ratio=norm_m/norm_d,computedonread" in _flat(res.output)
    t = trace_info(path)
    assert t["computed"] == ["ratio"] and t["columns"].index("ratio") == t["columns"].index("norm_d") + 1
    assert t["rows"] == len(original) and (t["first_step"], t["last_step"]) == (0, STEPS - 1)

    res = cli("plot", path, "--figure", "corrections", "-o", tmp_path / "c.png", "--window", 20)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_a_table_with_one_norm_and_no_ratio_is_still_refused(tmp_path, recorded):
    import pandas as pd

    p = tmp_path / "x.parquet"
    pd.read_parquet(recorded).drop(columns=["norm_d"]).to_parquet(p)
    with pytest.raises(GraftlabError, match="missing ratio") as err:
        read_trace(p)
    assert "norm_m and norm_d" in str(err.value) and "\n" not in str(err.value)


def _copied(src, p):
    shutil.copyfile(src, p)


def _sliced(src, p):
    table = pq.read_table(src)
    assert trace.METADATA_KEY in table.schema.metadata  # the marker rides along
    pq.write_table(table.slice(0, table.num_rows // 2), p)


@pytest.mark.parametrize("how", [_copied, _sliced])
def test_a_part_file_out_of_its_directory_is_read_without_metadata(tmp_path, recorded, monkeypatch, how):
    part = sorted(recorded.glob(trace.PART_GLOB))[0]
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "one.parquet"
    how(part, path)
    rel = "one.parquet"  # as typed in a shell: the old error named "."
    assert foreign.is_foreign(rel)
    df = read_trace(rel)
    n_steps = pq.read_metadata(path).num_rows // 16
    original = read_trace(recorded, steps=(0, n_steps))
    np.testing.assert_array_equal(df["ratio"].to_numpy().astype(np.float32), original["ratio"].to_numpy())
    np.testing.assert_array_equal(df["norm_g"].to_numpy(), original["norm_g"].to_numpy().astype(np.float64))
    line = foreign.note(read_metadata(rel))
    assert line.startswith("run metadata not found") and "_graftlab.json" in line and "\n" not in line

    res = cli("info", rel)
    assert res.exit_code == 0, res.output
    assert [ln for ln in res.output.splitlines() if ln.startswith("run metadata not found")]
    res = cli("distill", rel, "--window", 5, "-o", tmp_path / "c.json")
    assert res.exit_code == 0, res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("run metadata not found")]) == 1
    res = cli("plot", rel, "--figure", "corrections", "-o", tmp_path / "c.png", "--window", 5)
    assert res.exit_code == 0, res.output

    # the streamed reader (whole-trace schedules) reads it as the same table
    batches, _, meta = scan_ratios(rel)
    assert meta["foreign"]["orphan"] and sum(len(s) for s, _, _ in batches) == len(read_trace(rel))


def test_a_part_inside_its_trace_keeps_the_recorded_metadata(recorded):
    part = sorted(recorded.glob(trace.PART_GLOB))[1]
    assert not foreign.is_foreign(part)
    assert read_metadata(part) == read_metadata(recorded)
    assert read_trace(part)["step"].iloc[0] == FLUSH


def test_a_trace_directory_without_its_sidecar_reads_without_metadata(tmp_path, recorded):
    d = tmp_path / "t"
    shutil.copytree(recorded, d)
    (d / trace.SIDECAR).unlink()
    assert read_trace(d)["step"].max() == STEPS - 1
    assert read_metadata(d)["foreign"]["orphan"]
    batches, _, meta = scan_ratios(d)  # streamed as the table it now is
    assert meta["foreign"]["orphan"] and sum(len(s) for s, _, _ in batches) == len(read_trace(d))


def test_info_says_which_columns_are_stored_and_that_ratio_is_computed(recorded):
    res = cli("info", recorded)
    assert res.exit_code == 0, res.output
    flat = _flat(res.output)
    assert "columnsstep,group,norm_m,norm_d,norm_g,lr,loss(stored);ratio=norm_m/norm_d,computedonread" in flat
    t = trace_info(recorded)
    assert t["computed"] == ["ratio"] and "ratio" in t["columns"]
