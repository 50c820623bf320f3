"""A table from another tool whose columns hold the wrong kind of values is one error line before any
row is read: group names must be text, ratios and norms numbers."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graftlab.errors import GraftlabError
from graftlab.trace import read_metadata, read_trace


@pytest.mark.parametrize("column, values, says", [
    ("group", pa.array([{"x": 1}, {"x": 2}] * 2), "column group must hold group names \\(text\\), not struct"),
    ("group", pa.array([1.5, 2.5] * 2), "column group must hold group names \\(text\\), not double"),
    ("group", pa.array([b"a.weight", b"\xff\xfe"] * 2, pa.binary()), "column group holds bytes that are not UTF-8"),
    ("ratio", pa.array([True, False] * 2), "column ratio must hold numbers, not bool"),
    ("ratio", pa.array(["2.0", "1.0"] * 2), "column ratio must hold numbers, not string"),
])
def test_columns_of_the_wrong_kind_are_one_error(tmp_path, column, values, says):
    cols = {"step": pa.array([0, 0, 1, 1]), "group": pa.array(["a.weight", "b.weight"] * 2),
            "ratio": pa.array([1.0, 2.0, 3.0, 4.0]), column: values}
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table(cols), path)
    with pytest.raises(GraftlabError, match=says):
        read_metadata(path)
        read_trace(path)


def test_group_ids_and_utf8_bytes_are_names(tmp_path):
    for values in (pa.array([0, 1] * 2), pa.array([b"a.weight", "é.weight".encode()] * 2, pa.binary())):
        path = tmp_path / "t.parquet"
        pq.write_table(pa.table({"step": [0, 0, 1, 1], "group": values, "ratio": [1.0, 2.0, 3.0, 4.0]}), path)
        assert len(read_trace(path)) == 4
