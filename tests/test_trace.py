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
