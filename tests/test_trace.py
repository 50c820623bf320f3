"""The trace contract: writing helpers, read_trace vs pandas, pruned step-range reads, bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from graftlab import trace
from graftlab.errors import GraftlabError

GROUPS = ["a.weight", "a.bias", "b.weight"]


def meta() -> dict:
    return {"format": trace.FORMAT, "granularity": "layer",
            "groups": [{"name": n, "kind": "other", "ffn": None, "block": None, "shape": None, "numel": 1,
                        "members": [n]} for n in GROUPS]}


def stats_for(steps: np.ndarray) -> np.ndarray:
    s = np.empty((len(steps), 3, len(GROUPS)), dtype=np.float32)
    s[:, 0] = (steps[:, None] + 1) * np.array([1.0, 2.0, 3.0])
    s[:, 1] = 2.0
    s[:, 2] = s[:, 0] / s[:, 1]
    return s


def write_trace(tmp_path, parts=((0, 10), (10, 20), (20, 30)), loss_from=0):
    d = tmp_path / "t"
    d.mkdir()
    trace.write_sidecar(d, meta())
    for lo, hi in parts:
        steps = np.arange(lo, hi)
        scalars = {"loss": np.linspace(1, 0, hi - lo).astype(np.float32)} if lo >= loss_from else {}
        trace.write_part(d, trace.build_table(steps, GROUPS, stats_for(steps), scalars, meta()))
    return d


def test_layout_and_metadata(tmp_path):
    d = write_trace(tmp_path)
    names = sorted(p.name for p in d.iterdir())
    assert names == ["_graftlab.json", "part-000000000000.parquet", "part-000000000010.parquet",
                     "part-000000000020.parquet"]
    assert json.loads((d / "_graftlab.json").read_text()) == meta()
    for p in d.glob("part-*"):
        assert json.loads(pq.read_schema(p).metadata[trace.METADATA_KEY]) == meta()
        col = pq.ParquetFile(p).metadata.row_group(0).column(2)
        assert "BYTE_STREAM_SPLIT" in col.encodings and col.compression == "ZSTD"
    assert trace.read_metadata(d) == meta()


def test_read_trace_matches_pandas_and_values(tmp_path):
    d = write_trace(tmp_path)
    df = trace.read_trace(d)
    pdf = pd.read_parquet(d)
    assert len(df) == len(pdf) == 30 * len(GROUPS)
    pdf = pdf.assign(group=pdf["group"].astype(str)).sort_values(["step", "group"]).reset_index(drop=True)
    mine = df.sort_values(["step", "group"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[pdf.columns], pdf, check_dtype=False)
    assert df["step"].dtype == np.int64 and df["ratio"].dtype == np.float32
    assert list(df["group"][:3]) == GROUPS  # metadata group order within a step
    row = df[(df.step == 17) & (df.group == "b.weight")].iloc[0]
    assert row.norm_m == pytest.approx(18 * 3.0) and row.ratio == pytest.approx(27.0)
    assert df.attrs["graftlab"]["granularity"] == "layer"


def test_step_range_reads_only_needed_parts(tmp_path):
    d = write_trace(tmp_path)
    (d / "part-000000000010.parquet").write_bytes(b"not parquet")  # a part the range must not touch
    df = trace.read_trace(d, steps=(20, 25))
    assert sorted(df.step.unique()) == list(range(20, 25))
    df = trace.read_trace(d, steps=(None, 7), groups=["a.bias"])
    assert list(df.step) == list(range(7)) and set(df.group) == {"a.bias"}
    with pytest.raises(GraftlabError):
        trace.read_trace(d)


def test_parts_with_different_scalar_columns(tmp_path):
    d = write_trace(tmp_path, loss_from=10)  # first part has no loss column
    df = trace.read_trace(d)
    assert df["loss"].isna().sum() == 10 * len(GROUPS)
    assert df.loc[df.step >= 10, "loss"].notna().all()


def test_bad_paths(tmp_path):
    with pytest.raises(GraftlabError, match="no such trace"):
        trace.read_trace(tmp_path / "missing")
    with pytest.raises(GraftlabError, match="not a trace"):
        trace.read_trace(tmp_path)
    junk = tmp_path / "x.parquet"
    junk.write_text("hello")
    with pytest.raises(GraftlabError, match="not a readable"):
        trace.read_metadata(junk)
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"step": [0], "group": ["g"]}).to_parquet(plain)
    with pytest.raises(GraftlabError, match="no graftlab metadata"):
        trace.read_trace(plain)


def test_unknown_column(tmp_path):
    d = write_trace(tmp_path)
    with pytest.raises(GraftlabError, match="no column"):
        trace.read_trace(d, columns=["nope"])


# ------------------------------------------------------------------ extent, is_trace, resume helpers

def test_extent_matches_info_and_reads_only_the_end_footers(tmp_path):
    d = write_trace(tmp_path)
    info = trace.trace_info(d)
    assert trace.trace_extent(d) == (info["first_step"], info["last_step"]) == (0, 29)
    assert info["steps"] == 30 and info["parts"] == 3 and "loss" in info["columns"]
    (d / "part-000000000010.parquet").write_bytes(b"not parquet")  # the middle part is never opened
    assert trace.trace_extent(d) == (0, 29)
    single = tmp_path / "one.parquet"
    steps = np.arange(5, 9)
    pq.write_table(trace.build_table(steps, GROUPS, stats_for(steps), meta=meta()), single, write_statistics=False)
    assert trace.trace_extent(single) == (5, 8)  # no statistics: the step column is read instead
    assert trace.trace_info(single)["first_step"] == 5


def test_is_trace(tmp_path):
    d = write_trace(tmp_path)
    assert trace.is_trace(d) and trace.is_trace(d / "part-000000000000.parquet")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert not trace.is_trace(fresh) and not trace.is_trace(tmp_path / "missing")
    trace.write_sidecar(fresh, meta())  # a recording that has not flushed a part yet
    assert trace.is_trace(fresh)
    (tmp_path / "notes.txt").write_text("x")
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"step": [0]}).to_parquet(plain)
    assert not trace.is_trace(tmp_path / "notes.txt") and not trace.is_trace(plain)


def test_temporary_name_is_hidden_from_readers(tmp_path):
    tmp = trace.temporary_name(tmp_path / "part-000000000000.parquet")
    assert tmp.parent == tmp_path and tmp.name.startswith(".")
    assert not tmp.match(trace.PART_GLOB)


def test_truncate_keeps_earlier_steps_and_drops_half_written_parts(tmp_path):
    d = write_trace(tmp_path)
    half = trace.temporary_name(d / trace.part_name(30))
    half.write_bytes(b"half a part")
    trace.truncate(d, 15)
    assert sorted(p.name for p in d.glob(trace.PART_GLOB)) == ["part-000000000000.parquet", "part-000000000010.parquet"]
    assert not half.exists()
    df = trace.read_trace(d)
    assert sorted(df.step.unique()) == list(range(15))
    assert trace.read_metadata(d / "part-000000000010.parquet") == meta()  # the rewritten part keeps it


def test_prepare_directory_replaces_only_traces(tmp_path):
    from graftlab.errors import OutputExistsError

    d = write_trace(tmp_path)
    with pytest.raises(OutputExistsError, match="pass overwrite=True"):
        trace.prepare_directory(d)
    assert trace.prepare_directory(d, resume=True) == d and trace.is_trace(d)  # kept as it is
    trace.prepare_directory(d, overwrite=True)
    assert d.is_dir() and not any(d.iterdir())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for kw in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(GraftlabError, match="does not hold a graftlab trace"):
            trace.prepare_directory(mine, **kw)
    assert (mine / "notes.txt").read_text() == "keep"
    assert trace.prepare_directory(tmp_path / "new" / "t").is_dir()
