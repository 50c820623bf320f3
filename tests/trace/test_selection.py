"""What a read keeps (``steps=``, ``groups=``): a range that keeps nothing by its own bounds, or a
group name the trace does not hold, is a mistake said in one line, not an empty frame."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from graftlab import trace
from graftlab.errors import GraftlabError
from graftlab.trace import read_table, read_trace
from graftlab.trace.scanning import scan_batches, scan_ratios

from tests.trace.test_trace import GROUPS, write_trace


def _foreign(tmp_path, kind):
    steps = np.repeat(np.arange(30), len(GROUPS))
    df = pd.DataFrame({"step": steps, "group": GROUPS * 30, "norm_m": 1.0 + steps, "norm_d": 2.0})
    df["ratio"] = df["norm_m"] / df["norm_d"]
    path = tmp_path / f"other.{kind}"
    df.to_csv(path, index=False) if kind == "csv" else df.to_parquet(path)
    return path


@pytest.fixture(params=["v1", "v2", "parquet", "csv"])
def any_trace(request, tmp_path):
    if request.param in ("v1", "v2"):
        return write_trace(tmp_path, fmt=trace.FORMAT_1 if request.param == "v1" else trace.FORMAT)
    return _foreign(tmp_path, request.param)


@pytest.mark.parametrize("steps", [(50, 10), (10, 10), (5, 4)])
def test_empty_or_reversed_step_range_is_refused(any_trace, steps):
    for read in (read_trace, lambda p, **k: read_table(p, **k)[0]):
        with pytest.raises(GraftlabError, match=r"^steps must be \(start, stop\).*got \(" + str(steps[0])) as err:
            read(any_trace, steps=steps)
        assert err.value.params == ("steps",)
    with pytest.raises(GraftlabError, match="^steps must"):
        scan_ratios(any_trace, steps=steps)
    with pytest.raises(GraftlabError, match="^steps must"):
        scan_batches(any_trace, ["step", "group", "ratio"], steps=steps)


@pytest.mark.parametrize("steps", [(1.5, 4), ("0", 4), (0, 4, 8), 5])
def test_step_range_of_the_wrong_shape_is_refused(any_trace, steps):
    with pytest.raises(GraftlabError, match="^steps must"):
        read_trace(any_trace, steps=steps)


def test_open_ended_and_past_the_end_ranges_still_read(any_trace):
    assert len(read_trace(any_trace, steps=(None, 5))) == 5 * len(GROUPS)
    assert len(read_trace(any_trace, steps=(25, None))) == 5 * len(GROUPS)
    # a range past the recorded steps is a well-formed question with an empty answer
    assert len(read_trace(any_trace, steps=(100, 200))) == 0


def test_unknown_group_names_are_refused_naming_some_of_each(any_trace):
    wanted = ["a.weight", "no-such-group"] + [f"missing.{i}" for i in range(8)]
    with pytest.raises(GraftlabError) as err:
        read_trace(any_trace, groups=wanted)
    msg = str(err.value)
    assert err.value.params == ("groups",) and msg.startswith("groups ")
    assert "9 unknown" in msg and "'no-such-group'" in msg and "'missing.7'" not in msg  # a few, not all
    assert "'a.bias'" in msg and "'b.weight'" in msg and "\n" not in msg
    with pytest.raises(GraftlabError, match="unknown"):
        read_table(any_trace, groups=["nope"])


def test_known_groups_still_filter(any_trace):
    df = read_trace(any_trace, groups=["b.weight", "a.weight"])
    assert set(df["group"].astype(str)) == {"a.weight", "b.weight"} and len(df) == 60


def test_a_single_string_is_not_taken_for_its_letters(any_trace):
    with pytest.raises(GraftlabError, match="^groups .*list of group names.*'a.weight'"):
        read_trace(any_trace, groups="a.weight")


def test_step_bounds_beyond_int64_bound_nothing_on_their_side(any_trace):
    everything = read_trace(any_trace)
    assert len(read_trace(any_trace, steps=(0, 10 ** 30))) == len(everything) > 0
    assert len(read_trace(any_trace, steps=(-10 ** 30, 10))) == (everything["step"] < 10).sum()
    assert read_trace(any_trace, steps=(10 ** 30, None)).empty  # past every step: empty, as any range past the end
    assert read_trace(any_trace, steps=(10 ** 30, 10 ** 31)).empty
