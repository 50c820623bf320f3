"""The median engine (graftlab.distill.medians) against direct float64 references, dense and sparse grids."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from graftlab.distill import medians
from graftlab.errors import GraftlabError


def ref_running(x, width):
    h = width // 2
    out = []
    for i in range(len(x)):
        win = [v for v in x[max(0, i - h): i + h + 1] if math.isfinite(v)]
        out.append(statistics.median(win) if win else math.nan)
    return np.array(out)


@pytest.mark.parametrize("width", [1, 3, 51, 101])
@pytest.mark.parametrize("n", [1, 7, 60, 400])
def test_running_median_2d_matches_reference(width, n):
    rng = np.random.default_rng(width * 1000 + n)
    x = rng.lognormal(size=(37, n))  # 37 rows: several blocks, a ragged last one
    x[rng.random(x.shape) < 0.1] = np.nan
    x[5] = np.nan  # a row with nothing finite
    got = medians.running_median(x, width)
    for row in (0, 5, 16, 36):
        np.testing.assert_array_equal(got[row], ref_running(list(x[row]), width))
    np.testing.assert_array_equal(got[3], medians.running_median(x[3], width))  # 1-D agrees


def long_columns(rng, steps, names, drop=0.0):
    g = len(names)
    step = np.repeat(steps, g)
    code = np.tile(np.arange(g), len(steps))
    ratio = rng.lognormal(size=len(step)).astype(np.float32)
    ratio[rng.random(len(step)) < 0.05] = np.inf
    keep = rng.random(len(step)) >= drop
    return step[keep], code[keep], ratio[keep]


@pytest.mark.parametrize("drop", [0.0, 0.2])
def test_grid_windows_match_numpy_reference(drop):
    rng = np.random.default_rng(3)
    names = ["a", "b", "c", "d"]
    steps = np.arange(0, 3000, 3)  # recorded every 3rd step
    step, code, ratio = long_columns(rng, steps, names, drop)
    grid = medians.grid(step, code, ratio, names)
    assert (grid.recorded is None) == (drop == 0.0)
    starts, med, fin, non = grid.windows(500, start=100)
    assert list(starts) == list(range(100, 3000, 500))
    for k, s in enumerate(starts):
        for j, name in enumerate(grid.groups):
            sel = (code == names.index(name)) & (step >= s) & (step < s + 500)
            r = ratio[sel].astype(np.float64)
            finite = r[np.isfinite(r)]
            want = float(np.median(finite)) if finite.size else math.nan
            assert (med[k, j] == want) or (math.isnan(want) and math.isnan(med[k, j]))
            assert fin[k, j] == finite.size and non[k, j] == r.size - finite.size


def test_grid_filter_is_per_group_over_recorded_rows():
    rng = np.random.default_rng(4)
    names = ["a", "b"]
    step, code, ratio = long_columns(rng, np.arange(200), names, drop=0.3)
    grid = medians.grid(step, code, ratio, names).filtered(5)
    for j in range(2):
        sel = code == j
        r = np.where(np.isfinite(ratio[sel]), ratio[sel], np.nan).astype(np.float64)
        want = ref_running(list(r), 5)
        want[np.isnan(r)] = np.nan  # non-finite positions stay NaN
        got = grid.values[j, np.searchsorted(grid.steps, step[sel])]
        np.testing.assert_array_equal(got, want)


def test_grid_refuses_duplicates_and_bad_widths():
    with pytest.raises(GraftlabError, match="step 0 of group 'a' appears more than once"):
        medians.grid(np.array([0, 0, 1]), np.array([0, 0, 0]), np.ones(3), ["a"])
    with pytest.raises(GraftlabError, match="step 1 of group 'b' appears more than once"):  # the first repeat
        medians.grid(np.array([0, 0, 1, 1, 1, 2, 2]), np.array([0, 1, 0, 1, 1, 0, 1]), np.ones(7), ["a", "b"])
    for bad in (0, 2, -1, 2.5, True):
        with pytest.raises(GraftlabError, match="positive odd integer"):
            medians.running_median(np.ones(5), bad)


def write(path, parts, names_of=lambda lo: None):
    from graftlab import trace

    groups = [f"g{i}" for i in range(400)]
    meta = {"format": trace.FORMAT, "granularity": "layer",
            "groups": [{"name": n, "kind": "other", "ffn": None, "block": None, "shape": None, "numel": 1,
                        "members": [n]} for n in groups]}
    path.mkdir()
    trace.write_sidecar(path, meta)
    rng = np.random.default_rng(1)
    for lo, hi in parts:
        names = names_of(lo) or groups
        steps = np.arange(lo, hi)
        stats = rng.lognormal(size=(len(steps), 3, len(names))).astype(np.float32)
        stats[:, 1, ::37] = 0.0  # some zero D steps: inf ratios
        trace.write_part(path, trace.build_table(steps, names, stats, meta=meta))
    return path


def grid_via_frame(path, steps=None):
    from graftlab.trace import read_trace

    df = read_trace(path, steps=steps)
    codes = df["group"].cat.codes.to_numpy()
    return medians.grid(df["step"].to_numpy(), codes, df["ratio"].to_numpy(), list(df["group"].cat.categories))


@pytest.mark.parametrize("kind", ["batches split inside a step", "a part lacks groups"])
def test_read_grid_streams_the_same_grid_as_the_frame(tmp_path, kind):
    if kind.startswith("batches"):  # 160,000 rows in one part: Arrow's 131,072-row batches end mid-step
        path = write(tmp_path / "t", [(0, 400)])
    else:
        path = write(tmp_path / "t", [(0, 50), (50, 90)], lambda lo: [f"g{i}" for i in range(0, 400, 2)] if lo else None)
    got, meta = medians.read_grid(path, steps=(10, None))
    want = grid_via_frame(path, steps=(10, None))
    assert got.groups == want.groups and np.array_equal(got.steps, want.steps)
    assert np.array_equal(got.values, want.values, equal_nan=True)
    assert (got.recorded is None) == kind.startswith("batches")
    if got.recorded is not None:
        assert np.array_equal(got.recorded, want.recorded)


@pytest.mark.parametrize("width,want", [(None, None), (0, None), (1, None), (3, 3), (51, 51)])
def test_filter_width_zero_and_one_are_off(width, want):
    assert medians.filter_width(width, "filter") == want


@pytest.mark.parametrize("width", [2, -1, -3, 1.0, True, medians.MAX_WIDTH + 2])
def test_filter_width_refuses_the_rest_naming_the_parameter(width):
    with pytest.raises(GraftlabError, match=r"^width must be") as err:
        medians.filter_width(width, "width")
    assert err.value.params == ("width",)


def test_figures_refuse_a_negative_width_instead_of_drawing_unfiltered():
    import pandas as pd

    from graftlab.plots.common import smooth

    wide = pd.DataFrame({"a": [1.0, 5.0, 2.0]})
    assert smooth(wide, 0) is wide and smooth(wide, 1) is wide
    with pytest.raises(GraftlabError, match="width"):
        smooth(wide, -5)
