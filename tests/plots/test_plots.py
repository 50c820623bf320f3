"""Figures 4-8 and the corrections chart, checked on their data: lines, values, scales, labels, legends."""
from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from graftlab import plots  # noqa: E402
from graftlab.errors import GraftlabError  # noqa: E402
from graftlab.kinds import KIND_LABELS  # noqa: E402
from graftlab.trace import METADATA_KEY, SCHEMA, read_trace  # noqa: E402

# A two-block BERT-like layer-wise partition: (name, kind, ffn, block, numel, base ratio)
BLOCK = [
    ("attention.self.query.weight", "Q", None, 64 * 64, 8.0),
    ("attention.self.query.bias", "Q", None, 64, 30.0),
    ("attention.self.key.weight", "K", None, 64 * 64, 7.0),
    ("attention.self.value.weight", "V", None, 64 * 64, 0.8),
    ("attention.output.dense.weight", "attn_out", None, 64 * 64, 0.9),
    ("intermediate.dense.weight", "ffn", "fc1", 64 * 256, 0.7),
    ("output.dense.weight", "ffn", "fc2", 256 * 64, 0.6),
    ("output.LayerNorm.weight", "norm", None, 64, 0.09),
]
TOP = [
    ("embeddings.word_embeddings.weight", "embedding", None, None, 2000 * 64, 0.075),
    ("embeddings.position_embeddings.weight", "embedding", None, None, 128 * 64, 0.035),
    ("cls.predictions.bias", "output", None, None, 2000, 0.025),
]


def groups_spec(n_blocks: int = 2):
    out = list(TOP[:2])
    for b in range(n_blocks):
        out += [(f"encoder.layer.{b}.{n}", k, f, b, numel, base * (1 + b)) for n, k, f, numel, base in BLOCK]
    out.append(TOP[2])
    return out


def write_trace(path, *, steps: int, spec=None, granularity="layer", batch_size=32, lr=None, nan_steps=(),
                part_size=500, extra_meta=None, every=1):
    """A trace in the exact contract format (part files with the graftlab metadata and a sidecar)."""
    spec = spec if spec is not None else groups_spec()
    meta = {
        "format": "graftlab.trace/1",
        "granularity": granularity,
        "groups": [{"name": n, "kind": k, "ffn": f, "block": b, "shape": [numel], "numel": numel, "members": [n]}
                   for n, k, f, b, numel, _ in spec],
        "magnitude": {"class": "Adam", "hyperparameters": {"lr": 1e-3}},
        "direction": {"class": "SGD", "hyperparameters": {"lr": 1.0}},
        "task": "bert", "batch_size": batch_size, "seed": 0, "device": "cpu", "every": every,
        "versions": {"graftlab": "0.1.0", "torch": "2"}, "config": {},
    }
    meta.update(extra_meta or {})
    path.mkdir()
    (path / "_graftlab.json").write_text(json.dumps(meta))
    step = np.arange(0, steps, every, dtype=np.int64)
    rows = []
    for gi, (name, _, _, _, _, base) in enumerate(spec):
        # a smooth drift plus seeded +-20% noise that the median filter removes
        noise = np.random.default_rng(gi).uniform(-0.2, 0.2, size=step.size)
        r = base * np.exp(-step / max(steps, 1)) * (1 + noise)
        r = r.astype(np.float32)
        for s in nan_steps:
            r[step == s] = np.inf
        norm_d = np.where(np.isfinite(r), 1.0, 0.0).astype(np.float32)  # an infinite ratio: D's step was zero
        norm_m = np.where(np.isfinite(r), r, 1.0).astype(np.float32)
        rows.append(pd.DataFrame({"step": step, "group": name, "norm_m": norm_m, "norm_d": norm_d, "ratio": r}))
    df = pd.concat(rows).sort_values("step", kind="stable")
    if lr is not None:
        df["lr"] = lr(df["step"].to_numpy()).astype(np.float32)
    schema = SCHEMA
    if lr is not None:
        schema = schema.append(pa.field("lr", pa.float32()))
    schema = schema.with_metadata({METADATA_KEY: json.dumps(meta).encode()})
    for start in range(0, steps, part_size):
        part = df[(df["step"] >= start) & (df["step"] < start + part_size)]
        table = pa.Table.from_pandas(part, schema=schema, preserve_index=False)
        pq.write_table(table, path / f"part-{start:012d}.parquet")
    return path


@pytest.fixture(scope="module")
def layer_traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    a = write_trace(root / "bs32", steps=600, batch_size=32, nan_steps=(5,))
    b = write_trace(root / "bs128", steps=300, batch_size=128)
    return a, b


@pytest.fixture(scope="module")
def global_trace(tmp_path_factory):
    root = tmp_path_factory.mktemp("global")
    spec = [("global", "other", None, None, 1000, 0.05)]

    def lr(step):  # step decay at epochs 3 and 6 with 50 steps per epoch
        return 0.1 * 0.1 ** ((step >= 150).astype(float) + (step >= 300).astype(float))

    return write_trace(root / "g", steps=400, spec=spec, granularity="global", lr=lr,
                       extra_meta={"task": "resnet", "config": {"steps_per_epoch": 50},
                                   "magnitude": {"class": "SGD", "hyperparameters": {}},
                                   "direction": {"class": "Adagrad", "hyperparameters": {}}})


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _lines(ax):
    return [ln for ln in ax.get_lines() if ln.get_gid()]


def _legend_labels(legend):
    return [t.get_text() for t in legend.get_texts()]


def test_figure5_one_line_per_group_coloured_by_kind(layer_traces):
    path, _ = layer_traces
    fig = plots.figure5(path, steps=400)
    ax = fig.axes[0]
    lines = _lines(ax)
    df = read_trace(path)
    assert [ln.get_gid() for ln in lines] == list(pd.unique(df["group"]))
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "Training iterations"
    kinds = {g["name"]: g["kind"] for g in df.attrs["graftlab"]["groups"]}
    for ln in lines:
        assert ln.get_color() == plots.kind_color(kinds[ln.get_gid()]) or \
            matplotlib.colors.to_rgb(ln.get_color()) == matplotlib.colors.to_rgb(plots.kind_color(kinds[ln.get_gid()]))
    # first 400 steps, the non-finite step 5 dropped, values are the raw ratios
    q = next(ln for ln in lines if ln.get_gid() == "encoder.layer.0.attention.self.query.weight")
    x, y = q.get_data()
    assert x.min() == 0 and x.max() == 399 and 5 not in set(x) and len(x) == 399
    raw = df[df["group"] == q.get_gid()].set_index("step")["ratio"]
    np.testing.assert_allclose(y, raw.loc[x].to_numpy(), rtol=1e-6)
    # legend: one entry per kind, in the paper's wording and order
    assert ax.get_legend() is None and len(fig.legends) == 1  # under the plot, as in the paper
    labels = _legend_labels(fig.legends[0])
    assert labels == ["self-attention Q", "self-attention K", "self-attention V", "self-attention out",
                      "feedforward", "softmax / output", "embeddings", "misc (LayerNorm, ...)"]
    assert set(labels) <= set(KIND_LABELS.values())


def test_figure5_from_dataframe_matches_path(layer_traces):
    path, _ = layer_traces
    a = _lines(plots.figure5(path, steps=100).axes[0])
    b = _lines(plots.figure5(read_trace(path), steps=100).axes[0])
    assert len(a) == len(b)
    for la, lb in zip(a, b):
        np.testing.assert_array_equal(la.get_ydata(), lb.get_ydata())


def test_figure6_median_filter_width_51_two_runs(layer_traces):
    a, b = layer_traces
    fig = plots.figure6(a, b, steps=(400, 200))
    ax1, ax2 = fig.axes[:2]
    assert ax1.get_yscale() == ax2.get_yscale() == "log"
    assert "batch size 32" in ax1.get_title() and "batch size 128" in ax2.get_title()
    assert ax1.get_title().startswith("(a)") and ax2.get_title().startswith("(b)")
    assert max(ln.get_xdata().max() for ln in _lines(ax1)) == 399
    assert max(ln.get_xdata().max() for ln in _lines(ax2)) == 199
    # filtered values: a centred running median of width 51 over the finite ratios, in float64
    df = read_trace(a, steps=(0, 400))
    g = "encoder.layer.1.attention.self.key.weight"
    raw = df[df["group"] == g].sort_values("step")["ratio"].to_numpy(np.float64)
    raw[~np.isfinite(raw)] = np.nan
    ref = np.array([np.nanmedian(raw[max(0, i - 25): i + 26]) for i in range(len(raw))])
    line = next(ln for ln in _lines(ax1) if ln.get_gid() == g)
    np.testing.assert_allclose(line.get_ydata(), ref, rtol=1e-12)
    # the +-20% alternation is gone after filtering: neighbours differ by far less than 40%
    y = line.get_ydata()
    assert np.max(np.abs(np.diff(np.log(y[30:-30])))) < 0.05
    # one shared legend on the figure
    assert len(fig.legends) == 1
    assert "self-attention Q" in _legend_labels(fig.legends[0])


def test_figure7_all_iterations(layer_traces):
    a, b = layer_traces
    fig = plots.figure7(a, b)
    assert max(ln.get_xdata().max() for ln in _lines(fig.axes[0])) == 599
    assert max(ln.get_xdata().max() for ln in _lines(fig.axes[1])) == 299
    one = plots.figure7(a)
    assert len([ax for ax in one.axes if _lines(ax)]) == 1


def test_figure8_panels_one_line_per_block(layer_traces):
    a, b = layer_traces
    fig = plots.figure8(a, b, steps=(400, 200))
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert len(axes) == 16
    titles = [ax.get_title() for ax in axes[:8]]
    assert titles == [t for t, _, _ in plots.PANELS]
    by_title = {ax.get_title(): ax for ax in axes[:8]}
    q = _lines(by_title["Attention Q"])
    # the weight of each block, not the (smaller) bias
    assert [ln.get_gid() for ln in q] == ["encoder.layer.0.attention.self.query.weight",
                                          "encoder.layer.1.attention.self.query.weight"]
    assert [ln.get_label() for ln in q] == ["block 0", "block 1"]
    assert [ln.get_gid() for ln in _lines(by_title["Feed-forward FC2"])] == \
        [f"encoder.layer.{b}.output.dense.weight" for b in range(2)]
    assert {ln.get_gid() for ln in _lines(by_title["Embeddings"])} == \
        {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"}
    others = {ln.get_gid() for ln in _lines(by_title["Others"])}
    assert "encoder.layer.0.attention.self.query.bias" in others and "cls.predictions.bias" in others
    # every group is drawn exactly once per run
    drawn = [ln.get_gid() for ax in axes[:8] for ln in _lines(ax)]
    assert sorted(drawn) == sorted(pd.unique(read_trace(a)["group"]))
    assert all(ax.get_yscale() == "log" for ax in axes)


def test_figure4_schedule_against_epochs(global_trace):
    fig = plots.figure4(global_trace)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "Training epochs"
    lr, corr = _lines(ax)
    assert lr.get_gid() == "lr" and corr.get_gid() == "correction"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == \
        ["lr schedule for SGD", "correction for Adagrad, median-filtered (width 51)"]
    assert fig.get_suptitle().startswith("Figure 4: a learning-rate schedule for Adagrad")
    assert "SGD's learning rate" in ax.get_ylabel() and "Adagrad's correction" in ax.get_ylabel()
    x, y = lr.get_data()
    assert x[-1] == pytest.approx(399 / 50)
    np.testing.assert_allclose(y[x < 3], 0.1, rtol=1e-6)
    np.testing.assert_allclose(y[(x >= 3) & (x < 6)], 0.01, rtol=1e-6)
    np.testing.assert_allclose(y[x >= 6], 0.001, rtol=1e-5)
    raw = read_trace(global_trace)["ratio"].to_numpy(np.float64)
    ref = np.array([np.median(raw[max(0, i - 25): i + 26]) for i in range(len(raw))])
    np.testing.assert_allclose(corr.get_ydata(), ref, rtol=1e-12)
    # without steps per epoch the x axis is iterations
    fig = plots.figure4(global_trace, per_epoch=None, width=None)
    assert plots.steps_per_epoch({"config": {}}) is None


def test_figure4_needs_a_global_trace(layer_traces):
    with pytest.raises(GraftlabError, match="global trace"):
        plots.figure4(layer_traces[0])


def test_draws_on_given_axes(layer_traces):
    fig, (ax1, ax2) = plt.subplots(1, 2)
    out = plots.figure5(layer_traces[0], steps=50, ax=ax2)
    assert out is fig and _lines(ax2) and not _lines(ax1)
    assert "self-attention Q" in _legend_labels(ax2.get_legend())


def test_bad_inputs(tmp_path, layer_traces):
    with pytest.raises(GraftlabError, match="no such trace"):
        plots.figure5(tmp_path / "missing")
    with pytest.raises(GraftlabError):
        plots.figure5(layer_traces[0], steps=0)
    with pytest.raises(GraftlabError, match="metadata"):
        plots.figure5(pd.DataFrame({"step": [0], "group": ["a"], "ratio": [1.0]}))
    with pytest.raises(GraftlabError, match="step count"):
        plots.figure6(layer_traces[0], layer_traces[1], steps=(1, 2, 3))


def test_corrections_bars_median_and_rounded(layer_traces):
    from graftlab.distill.pipeline import distill

    path, _ = layer_traces
    fig = plots.corrections_bars(path, window=200, round="D500")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    corr = distill(path, window=200, round="D500")
    table = corr.summary()
    med = [p for p in ax.patches if p.get_gid() == "median"] or ax.containers[0].patches
    fac = [p for p in ax.patches if p.get_gid() == "factor"] or ax.containers[1].patches
    assert len(ax.containers) == 2 and len(ax.containers[0]) == len(table) == len(ax.containers[1])
    ends_med = [p.get_x() + p.get_width() for p in ax.containers[0]]
    ends_fac = [p.get_x() + p.get_width() for p in ax.containers[1]]
    np.testing.assert_allclose(ends_med, table["median"].to_numpy(np.float64), rtol=1e-9)
    np.testing.assert_allclose(ends_fac, table["factor"].to_numpy(np.float64), rtol=1e-9)
    # block groups are tied to beta; the rest rounded down to a power of ten within [0.1, 100]
    for g, f in zip(table["group"], table["factor"]):
        assert f == 500.0 if g.startswith("encoder.layer.") else f in (0.1, 1.0, 10.0, 100.0)
    # the float64 median of the first 200 steps of one group
    df = read_trace(path, steps=(0, 200))
    g = "embeddings.word_embeddings.weight"
    vals = df[df["group"] == g]["ratio"].to_numpy(np.float64)
    assert len(vals) == 200 and np.isfinite(vals).sum() == 199  # step 5 is not finite: skipped
    assert table.set_index("group").at[g, "median"] == pytest.approx(float(np.median(vals[np.isfinite(vals)])),
                                                                     rel=1e-12)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == list(table["group"])  # in trace order, the first at the top
    assert len(med) == len(fac) == len(table)


def test_cli_plot_writes_and_refuses_overwrite(layer_traces, global_trace, tmp_path):
    from typer.testing import CliRunner

    from graftlab.cli.app import app

    a, b = layer_traces
    runner = CliRunner()
    out = tmp_path / "f5.png"
    res = runner.invoke(app, ["plot", str(a), "--figure", "5", "--steps", "100", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, ["plot", str(a), "--figure", "5", "-o", str(out)])
    assert res.exit_code != 0 and "exists" in str(res.exception)
    figs = tmp_path / "all"
    res = runner.invoke(app, ["plot", str(a), str(b), "--figure", "all", "--window", "200", "-o", str(figs)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in figs.iterdir()) == \
        ["corrections.png", "figure5.png", "figure6.png", "figure7.png", "figure8.png"]
    g = tmp_path / "g"
    res = runner.invoke(app, ["plot", str(global_trace), "-o", str(g)])
    assert res.exit_code == 0, res.output
    assert [p.name for p in g.iterdir()] == ["figure4.png"]
    res = runner.invoke(app, ["plot", str(a), str(b), "--figure", "5", "-o", str(tmp_path / "x.png")])
    assert "one trace" in str(res.exception)


def test_cli_plot_all_to_an_image_name_writes_named_files_beside_it(layer_traces, global_trace, tmp_path):
    from typer.testing import CliRunner

    from graftlab.cli.app import app

    a, _ = layer_traces
    runner = CliRunner()
    res = runner.invoke(app, ["plot", str(a), "--steps", "100", "--window", "100", "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "x.png").exists()  # no folder named like an image
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["x-corrections.png", "x-figure5.png", "x-figure6.png", "x-figure7.png", "x-figure8.png"]
    assert (tmp_path / "x-figure5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, ["plot", str(a), "--steps", "100", "--window", "100", "-o", str(tmp_path / "x.png")])
    assert res.exit_code != 0 and "exists" in str(res.exception)  # each file is checked, none replaced
    res = runner.invoke(app, ["plot", str(global_trace), "-o", str(tmp_path / "g.svg")])  # one figure: the name
    assert res.exit_code == 0, res.output
    assert (tmp_path / "g.svg").read_text().lstrip().startswith("<?xml")


# --- what the figures show a reader: titles, labels, scales, legends inside the canvas ----------------

FIGURES = {
    "5": lambda a, b, g: plots.figure5(a, steps=400),
    "6": lambda a, b, g: plots.figure6(a, b, steps=(400, 200)),
    "6 one run": lambda a, b, g: plots.figure6(a, steps=400),
    "7": lambda a, b, g: plots.figure7(a, b),
    "7 one run": lambda a, b, g: plots.figure7(a),
    "8": lambda a, b, g: plots.figure8(a, b, steps=(400, 200)),
    "8 one run": lambda a, b, g: plots.figure8(a, steps=400),
    "4": lambda a, b, g: plots.figure4(g),
    "corrections": lambda a, b, g: plots.corrections_bars(a, window=200),
}


def _figure_legends(fig):
    """The legends of the figure and its subfigures (beside the axes, not on them)."""
    out = list(fig.legends)
    for sub in fig.subfigs:
        out += _figure_legends(sub)
    return out


def _titles(fig):
    """Every title a reader sees: the suptitles of the figure and its subfigures, and the axes titles."""
    out = [fig._suptitle] if fig._suptitle is not None else []
    for sub in fig.subfigs:
        out += _titles(sub)
    return out + [ax.title for ax in fig.axes if ax.get_title()]


def _inside(extent, fig, tol=1.0):
    box = fig.bbox
    return (extent.x0 >= box.x0 - tol and extent.x1 <= box.x1 + tol and
            extent.y0 >= box.y0 - tol and extent.y1 <= box.y1 + tol)


@pytest.mark.parametrize("name", list(FIGURES))
def test_legends_and_titles_inside_the_canvas(name, layer_traces, global_trace):
    fig = FIGURES[name](*layer_traces, global_trace)
    # Text widths do not scale exactly with dpi (hinting): check the screen, the CLI's 150 and print.
    for dpi in (72, 150):
        fig.set_dpi(dpi)
        fig.canvas.draw()  # the layout engine places the legends; extents are then final
        renderer = fig.canvas.get_renderer()
        beside = _figure_legends(fig)
        legends = beside + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert legends
        for legend in legends:
            extent = legend.get_window_extent(renderer)
            assert _inside(extent, fig), (name, dpi, _legend_labels(legend), extent, fig.bbox)
        for title in _titles(fig):
            assert _inside(title.get_window_extent(renderer), fig), (name, dpi, title.get_text())
        # the axes do not run under the legends placed beside them
        for legend in beside:
            extent = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not extent.overlaps(ax.get_window_extent(renderer)), (name, dpi, _legend_labels(legend))


def _suptitle(fig):
    return fig.get_suptitle().replace("\n", " ")


def test_each_figure_says_what_it_shows(layer_traces):
    a, b = layer_traces
    titles = {
        "5": _suptitle(plots.figure5(a, steps=400)),
        "5 filtered": _suptitle(plots.figure5(a, steps=400, width=51)),
        "6": _suptitle(plots.figure6(a, b, steps=(400, 200))),
        "7": _suptitle(plots.figure7(a, b)),
        "8": _suptitle(plots.figure8(a, b, steps=(400, 200))),
    }
    # Figure 5's two title lines are one centred suptitle (an axes title sits off-centre beside the y label)
    assert titles["5"] == ("Figure 5: per-layer learning-rate corrections, unfiltered "
                           "bert, Adam#SGD, batch size 32: first 400 iterations")
    assert titles["5 filtered"] == ("Figure 5: per-layer learning-rate corrections, median-filtered (width 51) "
                                    "bert, Adam#SGD, batch size 32: first 400 iterations")
    assert titles["6"] == "Figure 6: per-layer learning-rate corrections, median-filtered (width 51)"
    assert titles["7"] == "Figure 7: per-layer learning-rate corrections over all iterations, unfiltered"
    assert titles["8"] == ("Figure 8: per-layer learning-rate corrections by parameter type, "
                           "median-filtered (width 51)")
    assert len(set(titles.values())) == len(titles)
    # the panels name the run and the iterations they hold
    assert plots.figure5(a, steps=400).axes[0].get_title() == ""
    fig6 = plots.figure6(a, b, steps=(400, 200))
    assert [ax.get_title() for ax in fig6.axes] == ["(a) bert, Adam#SGD, batch size 32: first 400 iterations",
                                                    "(b) bert, Adam#SGD, batch size 128: first 200 iterations"]
    fig7 = plots.figure7(a, b)
    assert [ax.get_title() for ax in fig7.axes] == ["(a) bert, Adam#SGD, batch size 32: all 600 iterations",
                                                    "(b) bert, Adam#SGD, batch size 128: all 300 iterations"]
    # a trace shorter than the count asked for says how many iterations it held
    assert plots.figure6(b, steps=5000).axes[0].get_title().endswith("first 300 iterations")
    fig8 = plots.figure8(a, b, steps=(400, 200))
    assert [sub.get_suptitle() for sub in fig8.subfigs] == [
        "(a) bert, Adam#SGD, batch size 32: first 400 iterations",
        "(b) bert, Adam#SGD, batch size 128: first 200 iterations"]
    # on the caller's axes the figure's title heads the panel
    fig, ax = plt.subplots()
    plots.figure5(a, steps=100, width=51, ax=ax)
    assert ax.get_title().splitlines()[0] == titles["5 filtered"].split(" bert,")[0] and fig.get_suptitle() == ""
    # a DataFrame that starts mid-run is labelled with its iterations, not as "first"
    mid = read_trace(a, steps=(100, 300))
    assert plots.figure7(mid).axes[0].get_title().endswith("iterations 100-299")


def _check_decade_axis(ax):
    """A log y axis labelled at two or more powers of ten and nowhere else."""
    assert ax.get_yscale() == "log"
    lo, hi = ax.get_ylim()
    shown = [(t, lab.get_text()) for t, lab in zip(ax.get_yticks(), ax.get_yticklabels()) if lo <= t <= hi]
    assert len([t for t, text in shown if text]) >= 2, shown
    for t, text in shown:
        assert math.isclose(math.log10(t), round(math.log10(t)), abs_tol=1e-9), shown
    assert not any(lab.get_text() for lab in ax.yaxis.get_minorticklabels())


def test_axes_labels_and_decade_log_scales(layer_traces, global_trace):
    a, b = layer_traces
    ratio = plots.common.RATIO_LABEL
    for fig in (plots.figure5(a, steps=400), plots.figure6(a, b, steps=(400, 200)), plots.figure7(a, b)):
        fig.canvas.draw()
        first, *rest = fig.axes
        assert first.get_ylabel() == ratio
        _check_decade_axis(first)
        for ax in fig.axes:
            assert ax.get_xlabel() == "Training iterations"
        for ax in rest:  # the runs side by side share the first panel's y axis, labelled once
            assert ax.get_shared_y_axes().joined(ax, first) and ax.get_ylim() == first.get_ylim()
            assert ax.get_ylabel() == "" and ax.get_yscale() == "log"
    fig = plots.figure8(a, b, steps=(400, 200))
    fig.canvas.draw()
    for sub in fig.subfigs:
        grid = np.array(sub.axes).reshape(2, 4)
        assert all(ax.get_ylabel() == ratio for ax in grid[:, 0])
        assert all(ax.get_xlabel() == "Training iterations" for ax in grid[1])
        for ax in grid.flat:
            _check_decade_axis(ax)
    fig = plots.figure4(global_trace)
    fig.canvas.draw()
    _check_decade_axis(fig.axes[0])


def test_decade_axis_widens_a_view_inside_one_decade():
    fig, (ax1, ax2) = plt.subplots(1, 2)
    ax1.plot([0, 1], [3.0, 20.0])
    plots.common.decade_axis(ax1)
    assert ax1.get_ylim() == pytest.approx((1.0, 100.0))
    ax2.plot([0, 1], [0.5, 20.0])  # already shows 1 and 10: left as autoscaled
    ax2.set_yscale("log")
    before = ax2.get_ylim()
    plots.common.decade_axis(ax2)
    assert ax2.get_ylim() == before
    fig.canvas.draw()
    _check_decade_axis(ax1)
    _check_decade_axis(ax2)


def test_figure8_panels_per_kind_and_their_legends(layer_traces):
    a, _ = layer_traces
    fig = plots.figure8(a, steps=400)
    (sub,) = fig.subfigs
    by_title = {ax.get_title(): ax for ax in sub.axes}
    assert list(by_title) == ["Attention Q", "Attention K", "Attention V", "Attention out",
                              "Feed-forward FC1", "Feed-forward FC2", "Embeddings", "Others"]
    kinds = {g["name"]: (g["kind"], g["ffn"]) for g in read_trace(a).attrs["graftlab"]["groups"]}
    for title, kind, ffn in plots.PANELS[:6]:
        assert {kinds[ln.get_gid()] for ln in _lines(by_title[title])} == {(kind, ffn)}
    assert {kinds[ln.get_gid()][0] for ln in _lines(by_title["Embeddings"])} == {"embedding"}
    # one legend for the block shades beside the top row's last panel, one for the layer kinds of
    # "Others" beside that panel: each next to what it explains, over no panel, in readable type
    block_legend, others_legend = by_title["Attention out"].get_legend(), by_title["Others"].get_legend()
    assert not sub.legends
    assert block_legend.get_title().get_text() == "Transformer\nblock"
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for legend, panel in ((block_legend, by_title["Attention out"]), (others_legend, by_title["Others"])):
        box, pbox = legend.get_window_extent(renderer), panel.get_window_extent(renderer)
        assert 0 <= box.x0 - pbox.x1 <= 0.05 * fig.bbox.width and abs(box.y1 - pbox.y1) <= 0.02 * fig.bbox.height
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in sub.axes)
        assert min(t.get_fontsize() for t in legend.get_texts()) >= 8
    assert _legend_labels(block_legend) == ["block 0", "block 1"]
    q = _lines(by_title["Attention Q"])
    assert [matplotlib.colors.to_rgb(h.get_color()) for h in block_legend.get_lines()] == \
        [matplotlib.colors.to_rgb(ln.get_color()) for ln in q]
    others = _lines(by_title["Others"])
    drawn = {KIND_LABELS[kinds[ln.get_gid()][0]] for ln in others}
    assert _legend_labels(others_legend) == [lab for lab in plots.LABEL_ORDER if lab in drawn]
    for handle, label in zip(others_legend.get_lines(), _legend_labels(others_legend)):
        assert matplotlib.colors.to_rgb(handle.get_color()) == matplotlib.colors.to_rgb(plots.LABEL_COLORS[label])
    assert _legend_labels(by_title["Embeddings"].get_legend()) == ["word", "position"]


def test_figure8_block_legend_of_a_deep_model(tmp_path):
    deep = write_trace(tmp_path / "deep", steps=60, spec=groups_spec(12))
    fig = plots.figure8(deep, steps=60, width=None)
    block_legend = fig.subfigs[0].axes[3].get_legend()
    labels = _legend_labels(block_legend)
    assert len(labels) <= 8 and labels[0] == "block 0" and labels[-1] == "block 11"
    fig.canvas.draw()
    assert _inside(block_legend.get_window_extent(fig.canvas.get_renderer()), fig)


def test_plots_docstring_names_shipped_sample_traces():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    docs = "".join(m.__doc__ or "" for m in (plots, plots.layers, plots.panels, plots.schedule))
    named = set(re.findall(r"sample_traces/([\w.-]+)", docs))
    assert named >= {"bert-adam-sgd-bs16", "bert-adam-sgd-bs64", "resnet-sgd-adagrad-global"}
    for name in named:
        assert (root / "sample_traces" / name / "_graftlab.json").is_file(), name
