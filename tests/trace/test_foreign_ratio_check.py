"""A table from another tool that stores ``ratio`` beside ``norm_m`` and ``norm_d``: the ratio is
``norm_m / norm_d`` by definition, so rows where the two disagree are counted, and said in one
warning naming the column used, from the columns a read takes anyway."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graftlab.trace import read_trace
from graftlab.trace.scanning import scan_batches
from graftlab.trace.tables import RATIO_RTOL

GROUPS = ["a.weight", "a.bias", "b.weight"]


def _table(n_steps=30, dtype=np.float64):
    steps = np.repeat(np.arange(n_steps), len(GROUPS))
    m = (1.0 + steps * 0.37).astype(dtype)
    d = np.full(len(steps), 3.0, dtype)
    d[::7] = 0.0  # a zero D step: ratio inf (or nan where m is 0 too)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (m / d).astype(dtype)
    return pd.DataFrame({"step": steps, "group": GROUPS * n_steps, "norm_m": m, "norm_d": d, "ratio": ratio})


def _write(df, path):
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


@pytest.fixture(params=["parquet", "csv"])
def suffix(request):
    return "." + request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_consistent_table_reads_without_a_warning(tmp_path, suffix, dtype):
    path = _write(_table(dtype=dtype), tmp_path / f"t{suffix}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = read_trace(path)
    assert len(df) == 90


def test_rows_that_disagree_are_counted_in_one_warning_and_the_stored_ratio_is_used(tmp_path, suffix):
    df = _table()
    df.loc[[4, 40, 41], "ratio"] *= 1 + 10 * RATIO_RTOL  # three rows off by more than the tolerance
    df.loc[5, "ratio"] *= 1 + RATIO_RTOL / 10  # one inside it: rounding, not a disagreement
    assert np.isinf(df.loc[7, "ratio"])
    df.loc[7, "ratio"] = 2.0  # finite where D's step was zero
    path = _write(df, tmp_path / f"t{suffix}")
    with pytest.warns(UserWarning) as got:
        out = read_trace(path)
    said = [str(w.message) for w in got]
    assert len(said) == 1, said
    msg = said[0]
    assert "4 of 90 rows" in msg and "norm_m / norm_d" in msg and "column ratio is used" in msg
    assert "step 1, group 'a.bias'" in msg and "\n" not in msg  # the first row that disagrees
    np.testing.assert_array_equal(out["ratio"].to_numpy(), df["ratio"].to_numpy())  # as stored


def test_unknown_norms_disagree_with_nothing(tmp_path):
    df = _table()
    df.loc[10:20, ["norm_m", "norm_d"]] = np.nan  # another tool's "not measured"
    path = _write(df, tmp_path / "t.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_trace(path)


def test_a_scan_that_reads_all_three_columns_checks_them_too(tmp_path):
    df = _table()
    df.loc[7, "ratio"] = 123.0
    path = _write(df, tmp_path / "t.parquet")
    batches, _ = scan_batches(path, ("step", "group", "ratio", "norm_m", "norm_d"))
    with pytest.warns(UserWarning, match="1 of 90 rows"):
        list(batches)
    batches, _ = scan_batches(path, ("step", "group", "norm_m", "norm_d"))  # ratio not read: nothing to compare
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(batches)
