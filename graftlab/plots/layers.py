"""Per-layer correction figures of a layer-wise M#D trace: the paper's Figures 5, 6, 7 and 8.

Each line is one group's ratio ``||w_M - w_t|| / ||w_D - w_t||`` against the training iteration,
on a log axis, coloured by the group's layer kind::

    from graftlab import plots
    plots.figure5("trace_bs32", steps=2000).savefig("fig5.png")
    plots.figure6("trace_bs32", "trace_bs128", steps=(2000, 500)).savefig("fig6.png")
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from graftlab.errors import GraftlabError
from graftlab.plots.common import (
    MEDIAN_WIDTH,
    Trace,
    first_steps,
    kind_color,
    kind_legend,
    kinds_of,
    log_ratio_axis,
    new_axes,
    new_grid,
    plot_groups,
    ratio_table,
    run_label,
    smooth,
    style,
)

Steps = Union[int, None, Sequence[Optional[int]]]


def _per_trace(value: Steps, n: int) -> list[Optional[int]]:
    if value is None or isinstance(value, (int, np.integer)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise GraftlabError(f"expected {n} step count(s), one per trace, got {len(value)}")
    return value


def _traces(trace: Trace, trace2: Optional[Trace]) -> list[Trace]:
    return [trace] if trace2 is None else [trace, trace2]


def ratios(trace: Trace, *, steps: Optional[int] = None, width: Optional[int] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The data of a per-layer figure: (steps x groups ratios, median-filtered if ``width``; group kinds).

    ``steps`` keeps the first ``steps`` iterations (None: all). Non-finite ratios (D's step was zero)
    are NaN and are skipped by the filter and the lines.
    """
    df = first_steps(trace, steps)
    if df.empty:
        raise GraftlabError("trace has no rows in the requested steps")
    return smooth(ratio_table(df), width), kinds_of(df)


def _draw_layers(ax: Axes, trace: Trace, *, steps: Optional[int], width: Optional[int], title: Optional[str],
                 legend: bool) -> list[str]:
    wide, kinds = ratios(trace, steps=steps, width=width)
    drawn = plot_groups(ax, wide, kinds)
    log_ratio_axis(ax)
    ax.set_xlim(wide.index.min(), wide.index.max())
    if title:
        ax.set_title(title)
    if legend:
        kind_legend(ax, drawn, loc="upper right")
    return drawn


def figure5(trace: Trace, *, steps: Optional[int] = 2000, width: Optional[int] = None,
            ax: Optional[Axes] = None, fig: Optional[Figure] = None) -> Figure:
    """Figure 5: per-layer corrections over the first ``steps`` iterations, coloured by layer kind.

    ``width`` median-filters each line (the paper's Figure 5 is unfiltered).
    """
    with style():
        own = ax is None
        fig, ax = new_axes(ax, fig, figsize=(7.0, 5.2))
        df = first_steps(trace, steps)
        drawn = _draw_layers(ax, df, steps=None, width=width, title=run_label(df), legend=not own)
        if own:  # the paper's layout: the kinds listed under the plot
            kind_legend(fig, drawn, loc="outside lower center", ncol=4)
    return fig


def _side_by_side(traces: list[Trace], *, steps: list[Optional[int]], width: Optional[int],
                  fig: Optional[Figure]) -> Figure:
    with style():
        fig, axes = new_grid(fig, 1, len(traces), figsize=(6.5 * len(traces), 4.5))
        labels: list[str] = []
        for i, (ax, trace, n) in enumerate(zip(axes[0], traces, steps)):
            df = first_steps(trace, n)
            prefix = f"({'ab'[i]}) " if len(traces) > 1 else ""
            labels += _draw_layers(ax, df, steps=None, width=width, title=prefix + run_label(df), legend=False)
        kind_legend(fig, labels, loc="outside lower center", ncol=4)
    return fig


def figure6(trace: Trace, trace2: Optional[Trace] = None, *, steps: Steps = 2000,
            width: Optional[int] = MEDIAN_WIDTH, fig: Optional[Figure] = None) -> Figure:
    """Figure 6: Figure 5 median-filtered (width 51), two runs (two batch sizes) side by side.

    ``steps`` is one count for both traces or one per trace (the paper: 2000 at 8K, 500 at 32K).
    """
    traces = _traces(trace, trace2)
    return _side_by_side(traces, steps=_per_trace(steps, len(traces)), width=width, fig=fig)


def figure7(trace: Trace, trace2: Optional[Trace] = None, *, width: Optional[int] = None,
            fig: Optional[Figure] = None) -> Figure:
    """Figure 7: per-layer corrections over all recorded iterations, one panel per run."""
    traces = _traces(trace, trace2)
    return _side_by_side(traces, steps=[None] * len(traces), width=width, fig=fig)


# Figure 8's panels: (title, kind, ffn position); one line per transformer block in each.
PANELS = (
    ("Attention Q", "Q", None),
    ("Attention K", "K", None),
    ("Attention V", "V", None),
    ("Attention out", "attn_out", None),
    ("Attention FC1", "ffn", "fc1"),
    ("Attention FC2", "ffn", "fc2"),
    ("Embeddings", "embedding", None),
    ("Others", None, None),
)


def _block(value) -> Optional[int]:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else int(value)


def panel_groups(kinds: pd.DataFrame) -> dict[str, list[tuple[str, Optional[int]]]]:
    """Figure 8's assignment of groups to panels: ``{panel title: [(group, block), ...]}``.

    A block panel holds, for every block, that block's largest group of the panel's kind (the weight
    matrix, not its bias); embeddings hold every embedding group; everything else is in "Others".
    """
    out: dict[str, list[tuple[str, Optional[int]]]] = {title: [] for title, _, _ in PANELS}
    placed: set[str] = set()
    for title, kind, ffn in PANELS[:6]:
        sel = kinds[(kinds["kind"] == kind) & kinds["block"].map(lambda b: _block(b) is not None)]
        if ffn is not None:
            sel = sel[sel["ffn"] == ffn]
        numel = pd.to_numeric(sel["numel"], errors="coerce").fillna(0)
        for block, idx in sel.groupby(sel["block"].map(_block)).groups.items():
            group = numel.loc[idx].idxmax()
            out[title].append((group, block))
            placed.add(group)
        out[title].sort(key=lambda item: item[1])
    for group in kinds.index:
        if group in placed:
            continue
        key = "Embeddings" if kinds.at[group, "kind"] == "embedding" else "Others"
        out[key].append((group, _block(kinds.at[group, "block"])))
    return out


def _draw_panels(axes: np.ndarray, trace: Trace, *, steps: Optional[int], width: Optional[int]) -> None:
    wide, kinds = ratios(trace, steps=steps, width=width)
    panels = panel_groups(kinds)
    blocks = sorted({b for items in list(panels.values())[:6] for _, b in items})
    shades = dict(zip(blocks, sns.color_palette("viridis", max(len(blocks), 1))))
    for ax, (title, kind, _) in zip(axes.flat, PANELS):
        items = [(g, b) for g, b in panels[title] if wide[g].notna().any()]
        distinct = sns.color_palette("Dark2", max(len(items), 1))
        for i, (group, block) in enumerate(items):
            col = wide[group].dropna()
            if kind is not None and kind != "embedding":
                color, label = shades[block], f"block {block}"
            elif kind == "embedding":
                color, label = distinct[i], str(group).removesuffix(".weight").split(".")[-1]
            else:
                color, label = kind_color(kinds.at[group, "kind"]), str(group)
            ax.plot(col.index.to_numpy(), col.to_numpy(), color=color, lw=0.9, label=label, gid=str(group))
        ax.set_title(title, fontsize="medium")
        if items:
            ax.set_yscale("log")
        ax.set_xlim(wide.index.min(), wide.index.max())
        ax.set_xlabel("")
        if title == "Embeddings" and items:
            ax.legend(fontsize="x-small", loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("Training iterations")
    if blocks:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if len(blocks) <= 12 and handles:
            axes.flat[0].legend(handles, labels, fontsize="x-small", ncol=2, loc="best")


def figure8(trace: Trace, trace2: Optional[Trace] = None, *, steps: Steps = 2000,
            width: Optional[int] = MEDIAN_WIDTH, fig: Optional[Figure] = None) -> Figure:
    """Figure 8: Figure 6 split by parameter kind (Q, K, V, out, FC1, FC2, embeddings, others).

    One line per transformer block in the block panels; one 2 x 4 grid of panels per run.
    """
    traces = _traces(trace, trace2)
    counts = _per_trace(steps, len(traces))
    with style():
        if fig is None:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(13, 5.2 * len(traces)), layout="constrained")
        subfigs = fig.subfigures(len(traces), 1, squeeze=False)[:, 0]
        for sub, trace, n in zip(subfigs, traces, counts):
            df = first_steps(trace, n)
            axes = sub.subplots(2, 4, squeeze=False)
            _draw_panels(axes, df, steps=None, width=width)
            sub.suptitle(run_label(df))
    return fig
