"""Figures of many groups (per-row partitions, large models): per-kind medians and bands past
``MANY_GROUPS`` groups, a bounded number of artists, the figure at the paper's sizes unchanged."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from graftlab import plots  # noqa: E402
from graftlab.distill import degenerate  # noqa: E402
from graftlab.plots import lines  # noqa: E402
from graftlab.plots.common import DEGENERATE_LABEL, KIND_LABELS, LABEL_ORDER, kinds_of, ratio_table  # noqa: E402
from graftlab.trace import read_trace  # noqa: E402
from tests.plots.test_plots import groups_spec  # noqa: E402
from tests.plots.test_plots import write_trace as write_bert_trace  # noqa: E402
from tests.trace_builder import metadata, write_trace  # noqa: E402

KINDS = ("Q", "K", "ffn", "norm", "embedding")  # 5 kinds, each a different scale of ratio
N_GROUPS = 5000
N_STEPS = 4


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _many(path, n_groups=N_GROUPS, n_steps=N_STEPS):
    kinds = [KINDS[i % len(KINDS)] for i in range(n_groups)]
    groups = [{"name": f"encoder.layer.{i % 12}.part{i}.weight", "kind": k, "block": i % 12}
              for i, k in enumerate(kinds)]
    rng = np.random.default_rng(0)
    scale = np.array([10.0 ** KINDS.index(k) for k in kinds]) / 100
    ratios = scale * np.exp(rng.normal(0, 0.5, size=(n_steps, n_groups)))
    ratios[0, 7] = np.nan  # a missing value is skipped by the median and the band
    return write_trace(path, metadata(groups), np.arange(n_steps), ratios), kinds, ratios.astype(np.float32)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    return _many(tmp_path_factory.mktemp("many") / "t")


def test_figure5_of_many_groups_draws_per_kind_median_and_band(many):
    path, kinds, ratios = many
    fig = plots.figure5(path, steps=None)
    ax = fig.axes[0]
    # one median line and one band per kind: bounded, where one line per group is 5000 artists
    assert len(ax.get_lines()) == len(KINDS) and len(ax.collections) == len(KINDS)
    labels = [KIND_LABELS[k] for k in KINDS]
    assert {ln.get_gid() for ln in ax.get_lines()} == {f"median:{lab}" for lab in labels}
    kinds = np.array(kinds)
    for kind in KINDS:
        label = KIND_LABELS[kind]
        values = ratios[:, kinds == kind].astype(np.float64)
        lo, med, hi = np.nanquantile(values, (lines.BAND[0], 0.5, lines.BAND[1]), axis=1)
        line = next(ln for ln in ax.get_lines() if ln.get_gid() == f"median:{label}")
        np.testing.assert_array_equal(line.get_xdata(), np.arange(N_STEPS))
        np.testing.assert_allclose(line.get_ydata(), med, rtol=1e-12)
        band = next(c for c in ax.collections if c.get_gid() == f"band:{label}")
        verts = np.concatenate([p.vertices for p in band.get_paths()])
        for x in range(N_STEPS):  # the band's edges at each step are the kind's quantiles there
            ys = verts[np.isclose(verts[:, 0], x), 1]
            assert np.isclose(ys, lo[x], rtol=1e-12).any() and np.isclose(ys, hi[x], rtol=1e-12).any()
            assert ys.min() == pytest.approx(lo[x], rel=1e-12) and ys.max() == pytest.approx(hi[x], rel=1e-12)
    title = fig._suptitle.get_text()
    assert "5,000 groups: per-kind median, 10-90% band" in title
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [lab for lab in LABEL_ORDER if lab in labels]
    fig.canvas.draw()


def test_figures_6_7_8_of_many_groups_stay_bounded(many):
    path, _, _ = many
    for fig in (plots.figure6(path, steps=N_STEPS, width=3), plots.figure7(path)):
        ax = fig.axes[0]
        assert len(ax.get_lines()) == len(KINDS) and len(ax.collections) == len(KINDS)
        assert "5,000 groups" in ax.get_title()
    fig = plots.figure8(path, steps=N_STEPS, width=3)
    others = next(ax for ax in fig.axes if ax.get_title().startswith("Others"))
    assert "groups\nper-kind median, 10-90% band" in others.get_title()
    assert len(others.get_lines()) <= len(KINDS) and len(others.collections) <= len(KINDS)
    assert all(len(ax.get_lines()) <= lines.MANY_GROUPS for ax in fig.axes)  # the 1000 embeddings: lines
    embeddings = next(ax for ax in fig.axes if ax.get_title().startswith("Embeddings"))
    # their count in the title, not a legend of 1000 entries taller than the figure
    assert embeddings.get_title() == "Embeddings (1,000 groups)" and embeddings.get_legend() is None


def test_a_trace_of_one_step_draws_a_dot_and_a_bar_per_kind(tmp_path):
    path, kinds, ratios = _many(tmp_path / "t", n_groups=2000, n_steps=1)
    fig = plots.figure5(path)
    ax = fig.axes[0]
    medians = [ln for ln in ax.get_lines() if ln.get_gid().startswith("median:")]
    assert len(medians) == len(KINDS) and all(ln.get_marker() == "o" for ln in medians)
    xs = sorted(float(ln.get_xdata()[0]) for ln in medians)  # side by side around the step, not on top
    assert len(set(xs)) == len(KINDS) and -0.5 < xs[0] and xs[-1] < 0.5
    assert list(ax.get_xticks()) == [0]
    assert "iteration 0 only" in fig._suptitle.get_text()


def test_the_papers_sizes_keep_one_line_per_group(tmp_path):
    path = write_bert_trace(tmp_path / "t", steps=60, spec=groups_spec(3))
    df = read_trace(path)
    fig = plots.figure5(path, steps=None)
    ax = fig.axes[0]
    groups = list(pd.unique(df["group"]))
    assert [ln.get_gid() for ln in ax.get_lines()] == groups and not ax.collections
    wide = ratio_table(df)
    for ln in ax.get_lines():
        col = wide[ln.get_gid()].dropna()
        np.testing.assert_array_equal(ln.get_ydata(), col.to_numpy())
        assert ln.get_linestyle() == "-" and ln.get_marker() == "None"
    assert fig._suptitle.get_text() == ("Figure 5: per-layer learning-rate corrections, unfiltered\n"
                                        "bert, Adam#SGD, batch size 32: all 60 iterations")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        KIND_LABELS[k] for k in ("Q", "K", "V", "attn_out", "ffn", "output", "embedding", "norm")]


def test_the_switch_to_bands_is_past_many_groups(tmp_path, monkeypatch):
    path = write_bert_trace(tmp_path / "t", steps=30, spec=groups_spec(2))
    n = len(groups_spec(2))
    monkeypatch.setattr(lines, "MANY_GROUPS", n)
    assert len(plots.figure5(path).axes[0].get_lines()) == n
    monkeypatch.setattr(lines, "MANY_GROUPS", n - 1)
    ax = plots.figure5(path).axes[0]
    assert all(ln.get_gid().startswith("median:") for ln in ax.get_lines()) and len(ax.collections) > 0


def _trace_frame(names, kinds, ratio, norm_g=None, precision=None):
    n_steps = ratio.shape[0]
    df = pd.DataFrame({"step": np.repeat(np.arange(n_steps), len(names)),
                       "group": pd.Categorical(np.tile(names, n_steps), categories=names),
                       "ratio": ratio.ravel()})
    if norm_g is not None:
        df["norm_g"] = norm_g.ravel()
    df.attrs["graftlab"] = metadata([{"name": n, "kind": k} for n, k in zip(names, kinds)], precision=precision)
    return df


def _reference_degenerate(df, kinds):
    """Every group judged by assess(), as the figures did before judging only the candidates."""
    r = df["ratio"].to_numpy(dtype=np.float64)
    ok = np.isfinite(r) & (r > 0)
    med = pd.Series(r[ok]).groupby(df["group"].astype(str).to_numpy()[ok]).median()
    evidence = degenerate.assess(med, kinds["kind"].to_dict(), shares=degenerate.gradient_shares(df),
                                 precision=df.attrs["graftlab"].get("precision"))
    return {g for g, e in evidence.items() if e.degenerate}


@pytest.mark.parametrize("with_grad,precision", [(False, None), (True, None), (True, "bfloat16")])
def test_degenerate_groups_match_judging_every_group(with_grad, precision):
    rng = np.random.default_rng(1)
    names, kinds = [], []
    for b in range(6):
        for leaf, kind in (("query.weight", "Q"), ("query.bias", "Q"), ("key.weight", "K"), ("key.bias", "K")):
            names.append(f"encoder.layer.{b}.attention.self.{leaf}")
            kinds.append(kind)
    names.append("cls.predictions.bias")
    kinds.append("output")
    steps = 8
    ratio = np.exp(rng.normal(0, 0.3, size=(steps, len(names))))
    key_bias = np.array(["key.bias" in n for n in names])
    ratio[:, key_bias] *= np.array([1, 5, 50, 100, 1e3, 1e4])  # some 30x or more above their weight
    norm_g = None
    if with_grad:
        norm_g = np.exp(rng.normal(0, 0.3, size=ratio.shape))
        # key biases' gradients: float noise in some blocks, a bfloat16 run's noise in others, real in the rest
        norm_g[:, key_bias] *= np.array([1e-9, 1e-5, 1e-4, 1e-1, 1e-9, 1.0])
        norm_g[:, names.index("encoder.layer.2.attention.self.query.bias")] *= 1e-9  # noise, not gradient-free
        norm_g[:4, names.index("encoder.layer.5.attention.self.key.bias")] = np.nan  # partly unrecorded
        norm_g[:, names.index("encoder.layer.4.attention.self.key.bias")] = np.nan  # none recorded: structure rule
    df = _trace_frame(names, kinds, ratio, norm_g, precision)
    k = kinds_of(df)
    expected = _reference_degenerate(df, k)
    assert lines.degenerate_groups(df, k) == expected
    assert expected  # the case judges something


def test_kinds_of_groups_the_metadata_lacks_or_repeats():
    names = ["a.weight", "b.weight", "c.bias"]
    df = _trace_frame(names, ["Q", "ffn", "K"], np.ones((2, 3)))
    meta = df.attrs["graftlab"]
    meta["groups"] = [dict(meta["groups"][0], block=3, numel=7), dict(meta["groups"][1], kind="nonsense", ffn="fc1"),
                      dict(meta["groups"][0], kind="V")]  # c.bias missing, a.weight listed twice: the first wins
    k = kinds_of(df)
    assert list(k.index) == names
    assert list(k["kind"]) == ["Q", "other", "other"]
    assert list(k["label"]) == [KIND_LABELS["Q"], KIND_LABELS["other"], KIND_LABELS["other"]]
    assert k.at["a.weight", "block"] == 3 and k.at["a.weight", "numel"] == 7
    assert k.at["b.weight", "ffn"] == "fc1" and np.isnan(k.at["c.bias", "numel"])
    assert DEGENERATE_LABEL not in set(k["label"])


def _corrections_of(n):
    from graftlab.corrections import Corrections

    rng = np.random.default_rng(3)
    kinds = ["Q", "K", "ffn"]
    names = [f"encoder.layer.{i % 12}.x{i}" for i in range(n)]
    med = rng.lognormal(np.arange(n) % 3, 0.5)
    groups = {g: {"kind": kinds[i % 3], "median": float(m), "flags": "degenerate" if i == 5 else ""}
              for i, (g, m) in enumerate(zip(names, med))}
    return Corrections(multipliers={g: float(m) for g, m in zip(names, med)}, source={"groups": groups}), med


def test_a_corrections_chart_of_many_groups_is_one_bar_pair_per_kind_with_its_range():
    from graftlab.plots.corrections import corrections_bars

    corr, med = _corrections_of(lines.MANY_GROUPS + 200)
    ax = corrections_bars(corr).axes[0]
    medians = [p for p in ax.patches if p.get_gid() == "median"]
    assert len(medians) == 3 and len([p for p in ax.patches if p.get_gid() == "factor"]) == 3
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["self-attention Q (400 groups)", "self-attention K (400 groups)",
                      "feedforward (400 groups, 1 flagged)"]  # in the order of kinds, the first at the top
    top = max(medians, key=lambda p: p.get_y())  # Q's bar: its right end is the median over Q's groups
    assert top.get_x() + top.get_width() == pytest.approx(np.median(med[0::3]), rel=1e-9)
    ffn = min(medians, key=lambda p: p.get_y())  # the flagged group (5, a feedforward one) is left out
    assert ffn.get_x() + ffn.get_width() == pytest.approx(np.median(np.delete(med[2::3], 1)), rel=1e-9)
    assert "1,200 groups as per-kind median, 10-90% band" in ax.get_title()
    assert sum(1 for c in ax.collections if c.get_gid() == "median range") == 1  # the errorbars


def test_a_corrections_chart_at_the_paper_sizes_keeps_a_bar_per_group():
    from graftlab.plots.corrections import corrections_bars

    corr, _ = _corrections_of(60)
    ax = corrections_bars(corr).axes[0]
    assert len([p for p in ax.patches if p.get_gid() == "median"]) == 60
    assert "per-kind" not in ax.get_title()
