"""What every figure shares: loading a trace, layer-kind colours and labels, ratio tables, axes style.

The figures read only the trace contract (:mod:`graftlab.trace`) and the kind contract
(:mod:`graftlab.kinds`): a group's colour comes from the ``kind`` the recorder stored in the
trace's metadata, never from its name.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from graftlab.errors import GraftlabError
from graftlab.kinds import KIND_LABELS, KINDS
from graftlab.trace import PathLike, read_trace

Trace = Union[pd.DataFrame, PathLike]

MEDIAN_WIDTH = 51  # the paper's median filter width (Figures 6 and 8)

# Legend order of the paper's Figure 5, then the kinds the paper's BERT figures do not have.
LABEL_ORDER = tuple(dict.fromkeys(KIND_LABELS[k] for k in
                                  ("Q", "K", "V", "attn_out", "ffn", "output", "embedding", "norm", "conv")))
# One colour per legend label (kinds that share a label share a colour).
_PALETTE = sns.color_palette("tab10", 10)
LABEL_COLORS = {
    KIND_LABELS["Q"]: _PALETTE[0],
    KIND_LABELS["K"]: _PALETTE[1],
    KIND_LABELS["V"]: _PALETTE[2],
    KIND_LABELS["attn_out"]: _PALETTE[3],
    KIND_LABELS["ffn"]: _PALETTE[4],
    KIND_LABELS["output"]: _PALETTE[5],
    KIND_LABELS["embedding"]: _PALETTE[6],
    KIND_LABELS["norm"]: _PALETTE[7],
    KIND_LABELS["conv"]: _PALETTE[9],
}
assert set(LABEL_COLORS) == set(KIND_LABELS.values())


def kind_color(kind: str):
    """The colour of a layer kind (one of :data:`graftlab.kinds.KINDS`)."""
    return LABEL_COLORS[KIND_LABELS[kind]]


def load(trace: Trace, *, steps: Optional[tuple[Optional[int], Optional[int]]] = None,
         columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """A trace as a DataFrame (with its metadata in ``attrs``), restricted to ``start <= step < stop``.

    ``trace`` is a path (read with :func:`graftlab.trace.read_trace`, which reads only the parts
    that hold those steps) or a DataFrame that ``read_trace`` returned.
    """
    if isinstance(trace, pd.DataFrame):
        if "graftlab" not in trace.attrs:
            raise GraftlabError("trace DataFrame has no graftlab metadata (read it with graftlab.read_trace)")
        df = trace
        if steps is not None:
            start, stop = steps
            keep = np.ones(len(df), dtype=bool)
            if start is not None:
                keep &= df["step"].to_numpy() >= start
            if stop is not None:
                keep &= df["step"].to_numpy() < stop
            if not keep.all():
                attrs = df.attrs
                df = df[keep]
                df.attrs = attrs
        return df
    return read_trace(trace, steps=steps, columns=columns)


def first_steps(trace: Trace, n: Optional[int]) -> pd.DataFrame:
    """The rows of the first ``n`` steps of a trace (all of it when ``n`` is None)."""
    if n is not None and n <= 0:
        raise GraftlabError(f"number of steps must be positive, got {n}")
    if isinstance(trace, pd.DataFrame):
        df = load(trace)
        if n is None:
            return df
        start = int(df["step"].min()) if len(df) else 0
        return load(df, steps=(None, start + n))
    # The recorder's steps start at 0, so the first n steps are steps < n.
    return load(trace, steps=None if n is None else (None, n))


def group_names(df: pd.DataFrame) -> pd.Index:
    """The groups of a long trace in order of first appearance, as an Index of str named ``group``."""
    col = df["group"]
    if isinstance(col.dtype, pd.CategoricalDtype):
        # the categories seen, in the order rows first use them: no pass over the rows' strings
        codes = col.cat.codes.to_numpy()
        names = np.asarray(col.cat.categories, dtype=object)[pd.unique(codes[codes >= 0])]
    else:
        names = pd.unique(col.to_numpy())
    return pd.Index([str(n) for n in names], dtype=object, name="group")


def kinds_of(df: pd.DataFrame) -> pd.DataFrame:
    """Per group: ``kind``, ``ffn``, ``block``, ``numel`` from the metadata; unknown groups are ``other``."""
    meta = df.attrs.get("graftlab", {})
    groups = meta.get("groups") or []
    names = group_names(df)
    out = pd.DataFrame(index=names)
    # each group's row of the metadata, found by one hash lookup of all names (the first of a repeated name)
    known = pd.Index([str(g.get("name")) for g in groups], dtype=object)
    first = ~known.duplicated()
    at = known[first].get_indexer(names)  # -1: a group the metadata does not list
    pos = np.where(at >= 0, np.flatnonzero(first)[np.maximum(at, 0)], -1) if first.any() else np.full(len(names), -1)
    for col, default in (("kind", "other"), ("ffn", None), ("block", None), ("numel", np.nan)):
        if any(col in g for g in groups):
            values = pd.Series([g.get(col) for g in groups])  # the dtype a DataFrame of the groups would give
            column = values.reindex(pos).set_axis(names)  # -1 is no row: NaN
        else:
            column = pd.Series(default, index=names, dtype=np.float64 if default is np.nan else object)
        out[col] = column.where(column.notna(), default)
    kind = out["kind"]
    out["kind"] = kind.where(kind.isin(KINDS), "other")
    out["label"] = out["kind"].map(KIND_LABELS)
    return out


def ratio_table(df: pd.DataFrame, column: str = "ratio") -> pd.DataFrame:
    """Steps x groups table of ``column`` in metadata group order; non-finite values become NaN.

    For ``ratio`` (drawn on log axes) zeros become NaN too: a step where M took no step in any group
    (M's lr 0, as at the start of a warmup from 0; :mod:`graftlab.distill.idle`) and a group whose M
    step was zero have no place on a log axis, and a line to them would fall off the plot.
    """
    # placed by (step, group) position in numpy: pivot_table costs seconds per 10^5 groups
    codes, names = pd.factorize(df["group"])
    steps, rows = np.unique(df["step"].to_numpy(), return_inverse=True)
    values = np.full((len(steps), len(names)), np.nan)
    # the first row of a (step, group) held twice wins, as pivot_table's "first" (assigned last)
    values[rows[::-1], codes[::-1]] = df[column].to_numpy(dtype=np.float64)[::-1]
    present = ~np.isnan(values)  # steps and groups with no value at all are left out, as pivot_table does
    keep_rows, keep_cols = present.any(axis=1), present.any(axis=0)
    values = values[keep_rows][:, keep_cols]
    with np.errstate(invalid="ignore"):
        values[~np.isfinite(values) | ((values <= 0) if column == "ratio" else False)] = np.nan
    return pd.DataFrame(values, index=pd.Index(steps[keep_rows], name="step"),
                        columns=pd.Index([str(g) for g in np.asarray(names, dtype=object)[keep_cols]], dtype=object,
                                         name="group"))


def smooth(wide: pd.DataFrame, width: Optional[int]) -> pd.DataFrame:
    """Each column median-filtered with window ``width`` (the recorded samples; None, 0 or 1:
    unchanged; anything but an odd width is a GraftlabError, :func:`graftlab.distill.medians.filter_width`)."""
    from graftlab.distill.medians import filter_width, running_median

    width = filter_width(width, "width")
    if width is None:
        return wide

    values = wide.to_numpy(dtype=np.float64).T.copy()  # (groups, steps): every column in one call
    values[~np.isfinite(values)] = np.nan
    return pd.DataFrame(running_median(values, width).T, index=wide.index, columns=wide.columns)


def metadata(df: pd.DataFrame) -> dict[str, Any]:
    return df.attrs.get("graftlab", {})


def optimizer_name(meta: dict[str, Any], role: str, default: str) -> str:
    """The class name of M or D as the metadata records it (``torch.optim.adam.Adam`` -> ``Adam``)."""
    name = (meta.get(role) or {}).get("class") or default
    return str(name).rsplit(".", 1)[-1]


def run_label(df: pd.DataFrame) -> str:
    """A short title for a trace: its task, M#D and batch size."""
    meta = metadata(df)
    m = optimizer_name(meta, "magnitude", "M")
    d = optimizer_name(meta, "direction", "D")
    parts = [str(meta["task"])] if meta.get("task") else []
    parts.append(f"{m}#{d}")
    if meta.get("batch_size"):
        parts.append(f"batch size {meta['batch_size']}")
    return ", ".join(parts)


@contextmanager
def style() -> Iterator[None]:
    """Seaborn's whitegrid style for the figures drawn inside, without changing the user's defaults."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        yield


def _layout(fig: Figure) -> Figure:
    # the legends are placed "outside" the axes, which only constrained layout makes room for
    if fig.get_layout_engine() is None:
        fig.set_layout_engine("constrained")
    return fig


def new_axes(ax: Optional[Axes], fig: Optional[Figure], *, figsize=(7.0, 4.5)) -> tuple[Figure, Axes]:
    """The Axes to draw on: ``ax`` if given, else one new Axes on ``fig`` (or a new Figure)."""
    if ax is not None:
        return ax.figure, ax
    if fig is None:
        fig = plt.figure(figsize=figsize, layout="constrained")
    return _layout(fig), fig.add_subplot()


def new_grid(fig: Optional[Figure], nrows: int, ncols: int, *, figsize, **kwargs) -> tuple[Figure, np.ndarray]:
    if fig is None:
        fig = plt.figure(figsize=figsize, layout="constrained")
    axes = _layout(fig).subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def new_figure(fig: Optional[Figure], *, figsize) -> Figure:
    """``fig`` (given constrained layout if it has no layout engine), or a new Figure."""
    return plt.figure(figsize=figsize, layout="constrained") if fig is None else _layout(fig)


def filter_text(width: Optional[int]) -> str:
    """How the lines were smoothed, for titles: ``median-filtered (width 51)`` or ``unfiltered``."""
    return f"median-filtered (width {width})" if width is not None and width > 1 else "unfiltered"


def span_text(df: pd.DataFrame, steps: Optional[int]) -> str:
    """Which iterations a panel shows: ``first 2000 iterations``, ``all 600 iterations``, ``iterations 500-999``
    or ``iteration 0 only``.

    ``steps`` is the count that was asked for (None: all); the text says what the trace held.
    """
    step = df["step"].to_numpy()
    if step.size == 0:
        return "no iterations"
    first, last = int(step.min()), int(step.max())
    if first == last:
        return f"iteration {first} only"
    if first != 0:
        return f"iterations {first}-{last}"
    return f"{'all' if steps is None else 'first'} {last + 1} iterations"


def figure_title(fig, text: str, **kwargs):
    """``fig``'s own title (a suptitle above every panel), wrapped at spaces to fit the figure's width."""
    import textwrap

    kwargs.setdefault("fontsize", "large")
    title = fig.suptitle(text, **kwargs)
    get_renderer = getattr(fig.canvas, "get_renderer", None)
    if get_renderer is None:
        return title
    available = 0.9 * fig.bbox.width  # room for the dpi-dependent text widths (see fitted_legend)
    for _ in range(4):
        width = title.get_window_extent(get_renderer()).width
        if width <= available:
            break
        longest = max(len(line) for line in title.get_text().split("\n"))
        # characters per line in proportion to the room: a few tries absorb the uneven glyph widths
        chars = max(10, int(longest * available / width) - 1)
        title.set_text(textwrap.fill(text, chars, break_long_words=False))
    return title


RATIO_LABEL = r"$\|w_M - w_t\| \,/\, \|w_D - w_t\|$"


def decade_axis(ax: Axes, axis: str = "y") -> None:
    """A log axis labelled at powers of ten only (unlabelled minor ticks), showing at least two of them.

    Call it after drawing: a view inside one decade is widened to the decades around it, so a reader
    always has two labelled ticks to read the scale from.
    """
    from matplotlib.ticker import LogLocator, NullFormatter

    which = ax.yaxis if axis == "y" else ax.xaxis
    get_lim, set_lim = (ax.get_ylim, ax.set_ylim) if axis == "y" else (ax.get_xlim, ax.set_xlim)
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    lo, hi = sorted(get_lim())
    if lo > 0 and np.isfinite(hi):
        a, b = np.log10(lo), np.log10(hi)
        if np.floor(b) - np.ceil(a) + 1 < 2:
            low = np.floor(a)
            set_lim(10.0 ** low, 10.0 ** max(np.ceil(b), low + 1))
    which.set_major_locator(LogLocator(base=10))
    which.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10)))
    which.set_minor_formatter(NullFormatter())


def log_ratio_axis(ax: Axes, *, xlabel: str = "Training iterations") -> None:
    """The ratio axes of Figures 5-8: log y in decades, labelled with the ratio; call after drawing."""
    decade_axis(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(RATIO_LABEL)


def fitted_legend(fig, handles: Sequence, labels: Sequence[str], *, loc: str, ncol: int, **kwargs):
    """``fig.legend`` with up to ``ncol`` columns: fewer where the legend would be wider than ``fig``.

    An "outside" legend of a constrained layout gets room above or below the axes but not beside
    them, so a legend wider than the figure would be cut off at both sides.
    """
    get_renderer = getattr(fig.canvas, "get_renderer", None)  # Agg-based canvases measure text
    legend = None
    for n in range(max(1, min(ncol, len(labels))), 0, -1):
        if legend is not None:
            legend.remove()
        legend = fig.legend(handles, labels, loc=loc, ncol=n, **kwargs)
        if get_renderer is None:
            break
        # Both widths in pixels at the current dpi; text hinting makes the legend up to ~7% wider
        # (relative to the figure) at other dpis (72, 150, ...), hence the margin.
        if legend.get_window_extent(get_renderer()).width <= 0.9 * fig.bbox.width:
            break
    return legend


def kind_handles(labels: Sequence[str]) -> tuple[list, list[str]]:
    """Legend handles and labels: one per layer kind present in ``labels``, in the paper's order."""
    from matplotlib.lines import Line2D

    present = [lab for lab in LABEL_ORDER if lab in set(labels)]
    handles = [Line2D([], [], color=LABEL_COLORS[lab], lw=2) for lab in present]
    if DEGENERATE_LABEL in set(labels):
        handles.append(Line2D([], [], color="0.35", lw=2, ls=":"))
        present.append(DEGENERATE_LABEL)
    return handles, present


def kind_legend(ax_or_fig, labels: Sequence[str], **kwargs):
    """One legend entry per layer kind present, in the paper's order.

    On a figure the columns (``ncol``, default 2) are reduced until the legend fits its width.
    """
    handles, present = kind_handles(labels)
    kwargs.setdefault("ncol", 2)
    kwargs.setdefault("fontsize", "small")
    kwargs.setdefault("frameon", True)
    if isinstance(ax_or_fig, Axes):
        return ax_or_fig.legend(handles, present, **kwargs)
    return fitted_legend(ax_or_fig, handles, present, **kwargs)


DEGENERATE_LABEL = "degenerate (zero true gradient; not a correction)"
