"""Each analysis function against a direct reference (statistics / numpy in float64)."""
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from graftlab.distill import analysis as A, degenerate
from graftlab.errors import GraftlabError


def ref_filter(values, width):
    h = width // 2
    out = []
    for i in range(len(values)):
        win = [v for v in values[max(0, i - h): i + h + 1] if math.isfinite(v)]
        out.append(statistics.median(win) if win else math.nan)
    return out


@pytest.mark.parametrize("width", [1, 3, 5, 51])
def test_median_filter_matches_shrinking_window_reference(width):
    rng = np.random.default_rng(width)
    x = rng.lognormal(size=300)
    x[rng.choice(300, 30, replace=False)] = np.nan
    x[rng.choice(300, 10, replace=False)] = np.inf
    x[100:100 + width + 2] = np.nan  # a gap wider than the window
    got = A.median_filter(x, width)
    want = ref_filter(list(x), width)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=0, equal_nan=True)


def test_median_filter_edges_and_docstring():
    assert A.median_filter([1.0, 5.0, 2.0, float("nan"), 3.0], 3).tolist() == [3.0, 2.0, 3.5, 2.5, 3.0]
    assert A.median_filter([], 5).tolist() == []
    assert A.median_filter([7.0], 51).tolist() == [7.0]


@pytest.mark.parametrize("width", [0, 2, -3, 2.0, True])
def test_median_filter_rejects_bad_width(width):
    with pytest.raises(GraftlabError, match="odd"):
        A.median_filter([1.0, 2.0], width)


def long_frame(rng, n_steps=60, groups=("a", "b", "c")):
    rows = []
    for s in rng.permutation(n_steps):  # unsorted on purpose
        for g in groups:
            r = float(rng.lognormal()) if rng.random() > 0.1 else float(rng.choice([np.nan, np.inf]))
            rows.append((int(s), g, r))
    return pd.DataFrame(rows, columns=["step", "group", "ratio"])


def test_filter_groups_filters_each_group_in_step_order():
    rng = np.random.default_rng(0)
    df = long_frame(rng)
    out = A.filter_groups(df, 5)
    for g, part in out.groupby("group"):
        part = part.sort_values("step")
        want = ref_filter(list(part["ratio_raw"]), 5)
        want = [w if math.isfinite(r) else math.nan for w, r in zip(want, part["ratio_raw"])]
        np.testing.assert_allclose(part["ratio"], want, equal_nan=True)
    assert out.index.equals(df.index)


def test_window_medians_against_statistics():
    rng = np.random.default_rng(1)
    df = long_frame(rng, n_steps=100)
    got = A.window_medians(df, 40, start=10).set_index("group")
    for g in ("a", "b", "c"):
        sel = df[(df.group == g) & (df.step >= 10) & (df.step < 50)]["ratio"]
        fin = [v for v in sel if math.isfinite(v)]
        assert got.at[g, "median"] == pytest.approx(statistics.median(fin), rel=0, abs=0)
        assert got.at[g, "n_finite"] == len(fin)
        assert got.at[g, "n_nonfinite"] == len(sel) - len(fin)
    assert list(got.index) == list(dict.fromkeys(df.group))


def test_window_medians_all_nonfinite_group_gives_nan_and_counts():
    df = pd.DataFrame({"step": [0, 1, 0, 1], "group": ["a", "a", "b", "b"], "ratio": [np.inf, np.nan, 2.0, 4.0]})
    got = A.window_medians(df, 2).set_index("group")
    assert math.isnan(got.at["a", "median"]) and got.at["a", "n_nonfinite"] == 2
    assert got.at["b", "median"] == 3.0


def test_schedule_medians_piecewise_reference():
    steps = np.arange(10)
    df = pd.DataFrame({
        "step": np.concatenate([steps, steps]),
        "group": ["g"] * 10 + ["h"] * 10,
        # g: windows of 3 -> medians 2, 5, 5, 10 (merged); h: a window with no finite ratio
        "ratio": [1, 2, 3, 5, 5, 9, 4, 5, 6, 10] + [1, 1, 1, np.nan, np.inf, np.nan, 3, 3, 3, 2],
    })
    assert A.schedule_medians(df, 3) == {
        "g": [[0, 2.0], [3, 5.0], [9, 10.0]],
        "h": [[0, 1.0], [6, 3.0], [9, 2.0]],
    }
    wins = A.windowed_medians(df, 3)
    assert list(wins["start"].unique()) == [0, 3, 6, 9]
    assert wins.query("group == 'h' and start == 3")["n_nonfinite"].item() == 3


@pytest.mark.parametrize("x,want", [(18.83, 10), (312.94, 100), (0.45, 0.1), (1.0, 1), (100.0, 100), (999.999, 100),
                                    (1000.0, 1000), (0.1, 0.1), (0.0999, 0.01), (154101.58, 100000), (1e-7, 1e-7)])
def test_round_pow10(x, want):
    got = A.round_pow10(x)
    assert got == pytest.approx(want, rel=1e-12)
    assert got <= x
    assert got * 10 > x


def test_round_pow10_reference_sweep():
    for x in np.geomspace(1e-5, 1e6, 2001):
        got = A.round_pow10(x)
        assert got <= x < got * 10 * (1 + 1e-12)
        assert abs(math.log10(got) - round(math.log10(got))) < 1e-12


@pytest.mark.parametrize("x", [0.0, -1.0, math.nan, math.inf])
def test_round_pow10_rejects(x):
    with pytest.raises(GraftlabError):
        A.round_pow10(x)


def test_round_dbeta_paper_examples():
    med = {"pos": 18.8, "word": 312.9, "q1": 525.5, "v24": 193.9, "softmax": 62.8, "nsp": 0.66, "mlm_b": 479.54,
           "tiny": 0.002, "huge": 5000.0}
    tied = {"q1": True, "v24": True}
    got = A.round_dbeta(med, 500, tied)
    assert got.to_dict() == {"pos": 10, "word": 100, "q1": 500, "v24": 500, "softmax": 10, "nsp": 0.1,
                             "mlm_b": 100, "tiny": 0.1, "huge": 100}


@pytest.mark.parametrize("spec,want", [("none", ("none", None)), ("pow10", ("pow10", None)), ("D500", ("dbeta", 500.0)),
                                       ("D2.5", ("dbeta", 2.5)), ("d50", ("dbeta", 50.0))])
def test_parse_round(spec, want):
    assert A.parse_round(spec) == want


@pytest.mark.parametrize("spec", ["D0", "Dabc", "D-5", "D", "Dnan", "Dinf", "pow2", "", "500"])
def test_parse_round_rejects(spec):
    with pytest.raises(GraftlabError, match=f"^round '{spec}'"):
        A.parse_round(spec)


@pytest.mark.parametrize("spec,form", [("Dabc", "D"), ("DA", "D"), ("dA", "d"), ("DA0", "DA"), ("DA-5", "DA"),
                                       ("DAinf", "DA"), ("Da.", "Da"), ("D0", "D")])
def test_parse_round_names_the_form_typed(spec, form):
    """"Dabc" is D<beta> with a beta that is no number (not DA<beta> with "bc"), said as typed."""
    with pytest.raises(GraftlabError, match=f"{form}<beta> needs a positive finite beta, e.g. {form}500"):
        A.parse_round(spec)


def test_tied_groups_from_blocks_and_regex():
    table = pd.DataFrame({"kind": ["Q", "embedding", "norm"], "block": [0, None, 3]},
                         index=pd.Index(["l.0.q", "emb", "l.3.ln"], name="group"))
    groups = ["l.0.q", "emb", "l.3.ln", "unknown"]
    assert A.tied_groups(groups, table).tolist() == [True, False, True, False]
    assert A.tied_groups(groups, table, tie=r"\.q$|emb").tolist() == [True, True, False, False]
    with pytest.raises(GraftlabError, match="regex"):
        A.tied_groups(groups, table, tie="(")
    assert A.group_kinds(groups, table).tolist() == ["Q", "embedding", "norm", "other"]


def test_flag_groups_and_fallback():
    med = pd.Series({"q": 8.0, "k": 6.0, "v": 0.8, "ln": 0.09, "kb": 1e4, "dead": np.nan, "still": 0.0})
    flags = degenerate.flag_groups(med, degenerate=["kb", "dead"])  # as graftlab.distill.degenerate decides them
    assert flags.to_dict() == {"q": "", "k": "", "v": "", "ln": "", "kb": degenerate.FLAG_DEGENERATE,
                               "dead": degenerate.FLAG_EMPTY, "still": degenerate.FLAG_ZERO}
    # a ratio alone flags nothing unless the opt-in outlier rule asks for it
    assert (degenerate.flag_groups(med) == degenerate.FLAG_DEGENERATE).sum() == 0
    assert degenerate.flag_groups(med, outlier=degenerate.OUTLIER).to_dict() == flags.to_dict()
    kinds = pd.Series({"q": "Q", "k": "K", "v": "V", "ln": "norm", "kb": "K", "dead": "norm", "still": "other"})
    fb = degenerate.fallback_factors(med, kinds, flags)
    assert fb.to_dict() == {"q": 8.0, "k": 6.0, "v": 0.8, "ln": 0.09, "kb": 6.0, "dead": 0.09, "still": 1.0}


def _piecewise_one_by_one(table, value="median"):
    """The rule of analysis.piecewise applied group by group: the reference for the grid version."""
    out = {}
    for name, part in table.groupby("group", sort=False):
        part = part.sort_values("start")
        vals = part[value].to_numpy(dtype=np.float64)
        ok = np.isfinite(vals)
        if not ok.any():
            continue
        filled = pd.Series(np.where(ok, vals, np.nan)).ffill().bfill().to_numpy()
        pieces = []
        for s, f in zip(part["start"].to_numpy(), filled):
            if not pieces or f != pieces[-1][1]:
                pieces.append([int(s), float(f)])
        pieces[0][0] = 0
        out[str(name)] = pieces
    return out


@pytest.mark.parametrize("seed", range(5))
def test_piecewise_is_the_rule_group_by_group(seed):
    from graftlab.distill.analysis import piecewise

    rng = np.random.default_rng(seed)
    for trial in range(40):
        names = [f"g{i}" for i in rng.permutation(int(rng.integers(1, 30)))]
        starts = np.sort(rng.choice(10_000, int(rng.integers(1, 12)), replace=False))
        rows = [(g, s, rng.choice([1.0, 2.0, np.nan, np.inf, -np.inf, rng.lognormal()])) for s in starts for g in names]
        table = pd.DataFrame(rows, columns=["group", "start", "median"]).sample(frac=1, random_state=trial)
        got, want = piecewise(table), _piecewise_one_by_one(table)
        assert got == want and list(got) == list(want)
    assert piecewise(pd.DataFrame(columns=["group", "start", "median"])) == {}
