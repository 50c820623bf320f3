"""What the figures mark for a reader: degenerate groups, LayerNorms above the rest, lr-0 steps off
the log axes, and a corrections chart that says what it shows."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from graftlab import plots  # noqa: E402
from tests.plots.test_plots import groups_spec, write_trace  # noqa: E402

KEY_BIAS = ("encoder.layer.0.attention.self.key.bias", "K", None, 0, 64, 1e5)  # true gradient 0: D's step is noise


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return write_trace(tmp_path_factory.mktemp("marks") / "t", steps=200, spec=groups_spec() + [KEY_BIAS])


def test_degenerate_groups_are_dotted_and_named_in_the_legend(trace):
    fig = plots.figure5(trace, steps=200)
    lines = {ln.get_gid(): ln for ln in fig.axes[0].get_lines() if ln.get_gid()}
    assert lines[KEY_BIAS[0]].get_linestyle() == ":"
    assert all(ln.get_linestyle() == "-" for g, ln in lines.items() if g != KEY_BIAS[0])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[-1] == plots.common.DEGENERATE_LABEL
    # LayerNorm lines are drawn above the block lines that would hide them
    norm = [ln for g, ln in lines.items() if "LayerNorm" in g]
    assert norm and all(ln.get_zorder() > lines["encoder.layer.0.attention.self.query.weight"].get_zorder()
                        for ln in norm)


def test_steps_where_ms_lr_was_zero_are_off_the_log_axes(tmp_path):
    path = write_trace(tmp_path / "t", steps=50, spec=groups_spec()[:3])
    import pyarrow.parquet as pq

    part = next(path.glob("part-*.parquet"))
    table = pq.read_table(part)
    df = table.to_pandas()
    df.loc[df["step"] < 3, ["norm_m", "ratio"]] = 0.0  # a warmup from lr 0: M took no step
    pq.write_table(pa_table(df, table.schema), part)
    wide, _ = plots.ratios(path)
    assert wide.loc[[0, 1, 2]].isna().all().all() and wide.loc[3:].notna().all().all()
    fig = plots.figure5(path, steps=50)
    for ln in fig.axes[0].get_lines():
        if ln.get_gid():
            assert np.all(ln.get_ydata() > 0) and ln.get_xdata()[0] == 3


def pa_table(df, schema):
    import pyarrow as pa

    return pa.Table.from_pandas(df, schema=schema, preserve_index=False)


@pytest.mark.parametrize("round, factor_label, says", [("none", "factor (the median, not rounded)", "not rounded"),
                                                         ("D500", "rounded factor", "rounded D500")])
def test_corrections_chart_says_trace_window_and_rounding(trace, round, factor_label, says):
    fig = plots.corrections_bars(trace, window=100, round=round)
    title = fig.axes[0].get_title()
    assert title == f"Corrections from t: median over steps 0..99, {says}"
    labels = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert factor_label in labels and ("rounded factor" in labels) == (round != "none")
