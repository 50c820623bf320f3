"""Traces that lost a part file (steps missing between parts), and part files copied without the
trace's _graftlab.json."""
from __future__ import annotations

import re
import shutil
import warnings

import pytest
import torch
from typer.testing import CliRunner

import graftlab
from graftlab import trace
from graftlab.trace import foreign
from graftlab.cli.app import app
from graftlab.errors import GraftlabError
from graftlab.record.recorder import Recorder
from graftlab.trace import read_metadata, read_trace, trace_info
from tests import models

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _flat(text):
    """Text without spaces, newlines and table borders: what a rich table wraps reads whole."""
    return re.sub(r"[\s│]", "", text)


def _record(path, steps, every=1, flush=10):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = models.make("block", dtype=torch.float32)
    opt = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2),
                         torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), names=model)
    with Recorder(opt, path, every=every, flush_every=flush, model=model) as rec:
        for x, y in models.batches("block", steps, dtype=torch.float32):
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    return path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return _record(tmp_path_factory.mktemp("rec") / "t", 80)


@pytest.fixture
def gapped(tmp_path, recorded):
    d = tmp_path / "g"
    shutil.copytree(recorded, d)
    (d / trace.part_name(30)).unlink()
    return d


def test_read_trace_warns_once_naming_the_missing_steps(gapped):
    with pytest.warns(UserWarning, match=r"steps 30\.\.39 are missing") as caught:
        df = read_trace(gapped)
    assert len([w for w in caught if "missing" in str(w.message)]) == 1
    assert 30 not in set(df["step"])
    with pytest.warns(UserWarning, match=r"steps 30\.\.39"):  # a window that meets the gap
        read_trace(gapped, steps=(30, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_trace(gapped, steps=(0, 30))
        read_trace(gapped, steps=(40, 80))
        read_trace(gapped, steps=(0, 30), groups=[read_metadata(gapped)["groups"][0]["name"]])


def test_info_says_which_steps_are_missing(gapped, recorded):
    assert trace_info(gapped)["gaps"] == [(30, 39)]
    assert trace_info(recorded)["gaps"] == []
    res = cli("info", gapped)
    assert res.exit_code == 0, res.output
    assert _flat("steps 30..39 missing (a part file is gone?)") in _flat(res.output)


def test_distill_refuses_a_window_holding_the_gap(gapped, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GraftlabError, match=r"window of steps 0\.\.49 lacks steps 30\.\.39") as err:
            graftlab.distill.distill(gapped, window=50)
        assert "\n" not in str(err.value)
        with pytest.raises(GraftlabError, match=r"lacks steps 30\.\.39"):
            graftlab.distill.distill(gapped, window=20, schedule=True)
        graftlab.distill.distill(gapped, window=30)  # steps 0..29 are all there
        graftlab.distill.distill(gapped, window=20, start=40)
    res = cli("distill", gapped, "--window", 50, "-o", tmp_path / "c.json")
    assert isinstance(res.exception, GraftlabError) and "lacks steps 30..39" in str(res.exception)
    assert not (tmp_path / "c.json").exists()


def test_a_trace_recorded_every_k_steps_has_no_gap(tmp_path):
    path = _record(tmp_path / "t", 60, every=3, flush=4)
    assert len(list(path.glob(trace.PART_GLOB))) == 5
    assert trace_info(path)["gaps"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_trace(path)
        graftlab.distill.distill(path, window=30)
    (path / trace.part_name(24)).unlink()
    assert trace_info(path)["gaps"] == [(24, 33)]


def test_a_folder_of_parts_without_the_sidecar_reads_as_one_copied_part(tmp_path, recorded):
    parts = tmp_path / "parts"
    parts.mkdir()
    for p in recorded.glob(trace.PART_GLOB):
        shutil.copyfile(p, parts / p.name)
    assert foreign.is_foreign(parts)
    df = read_trace(parts)
    original = read_trace(recorded)
    assert (df["step"].to_numpy() == original["step"].to_numpy()).all()
    assert (df["ratio"].to_numpy() == original["ratio"].to_numpy().astype("float64")).all()
    line = foreign.note(read_metadata(parts))
    assert line.startswith("run metadata not found") and "copying the trace's _graftlab.json beside" in line
    assert line == foreign.note(read_metadata(parts / trace.part_name(0)))
    res = cli("info", parts)
    assert res.exit_code == 0, res.output
    assert [ln for ln in res.output.splitlines() if ln.startswith("run metadata not found")] == [line]
    flat = _flat(res.output)
    assert _flat(foreign.source(read_metadata(parts))) in flat and _flat("in 8 part files") in flat
    res = cli("distill", parts, "--window", 20, "-o", tmp_path / "c.json")
    assert res.exit_code == 0, res.output
    assert [ln for ln in res.output.splitlines() if ln.startswith("run metadata not found")] == [line]
    res = cli("plot", parts, "--figure", "corrections", "-o", tmp_path / "c.png", "--window", 20)
    assert res.exit_code == 0, res.output
    assert f"{parts}: {line}" in res.output


def test_info_and_plot_name_a_copied_part_alike(tmp_path, recorded):
    one = tmp_path / "one.parquet"
    shutil.copyfile(recorded / trace.part_name(0), one)
    what = foreign.source(read_metadata(one))
    assert what.startswith(trace.FORMAT) and "_graftlab.json" in what and what in foreign.note(read_metadata(one))
    flat = _flat(cli("info", one).output)
    assert _flat(f"format {what}") in flat and _flat("rows in one Parquet file") in flat


def test_info_counts_a_csv_as_one_file(tmp_path, recorded):
    csv = tmp_path / "t.csv"
    read_trace(recorded)[["step", "group", "ratio"]].to_csv(csv, index=False)
    flat = _flat(cli("info", csv).output)
    assert _flat(f"{80 * len(read_metadata(recorded)['groups'])} rows in one CSV file") in flat
    assert _flat("rows in 8 part files") in _flat(cli("info", recorded).output)
