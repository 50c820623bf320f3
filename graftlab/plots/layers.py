"""Per-layer correction figures of a layer-wise M#D trace: the paper's Figures 5, 6 and 7.

Each line is one group's ratio ``||w_M - w_t|| / ||w_D - w_t||`` against the training iteration,
on a log axis, coloured by the group's layer kind::

    from graftlab import plots
    plots.figure5("sample_traces/bert-adam-sgd-bs16", steps=2000).savefig("fig5.png")
    plots.figure6("sample_traces/bert-adam-sgd-bs16", "sample_traces/bert-adam-sgd-bs64",
                  steps=(2000, 500)).savefig("fig6.png")

Figure 8 (the same lines split by parameter type) is in :mod:`graftlab.plots.panels`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from graftlab.errors import GraftlabError
from graftlab.plots.common import (
    MEDIAN_WIDTH,
    Trace,
    figure_title,
    filter_text,
    first_steps,
    kind_legend,
    kinds_of,
    log_ratio_axis,
    new_axes,
    new_grid,
    ratio_table,
    run_label,
    smooth,
    span_text,
    style,
)
from graftlab.plots.lines import aggregated, band_text, degenerate_groups, plot_groups, x_span

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


def _draw_layers(ax: Axes, df: pd.DataFrame, *, width: Optional[int], title: Optional[str],
                 legend: bool) -> tuple[list[str], Optional[str]]:
    """Draw a trace's lines on ``ax``: (the labels drawn, the note saying the groups were
    aggregated into per-kind bands, or None)."""
    wide, kinds = ratios(df, width=width)
    drawn = plot_groups(ax, wide, kinds, degenerate=degenerate_groups(df, kinds))
    x_span(ax, wide.index)
    log_ratio_axis(ax)
    note = band_text(wide.shape[1]) if aggregated(wide.shape[1]) else None
    if title:
        ax.set_title(title if note is None else f"{title}\n{note}")
    if legend:
        kind_legend(ax, drawn, loc="upper right")
    return drawn, note


def figure5(trace: Trace, *, steps: Optional[int] = 2000, width: Optional[int] = None,
            ax: Optional[Axes] = None, fig: Optional[Figure] = None) -> Figure:
    """Figure 5 (paper, Section 5): per-layer corrections over the first ``steps`` iterations.

    One line per group: its ratio ``||w_M - w_t|| / ||w_D - w_t||`` (dimensionless) per step, on a
    log axis, coloured by layer kind. ``steps`` keeps the first iterations (None: all); ``width``
    median-filters each line (the paper's Figure 5 is unfiltered). The figure is titled with what it
    shows; on a given ``ax`` that title heads the panel instead. Raises
    :class:`~graftlab.errors.GraftlabError` for a missing trace or a non-positive ``steps``.
    """
    with style():
        own = ax is None
        fig, ax = new_axes(ax, fig, figsize=(7.0, 5.4))
        df = first_steps(trace, steps)
        what = f"Figure 5: per-layer learning-rate corrections, {filter_text(width)}"
        panel = f"{run_label(df)}: {span_text(df, steps)}"
        drawn, note = _draw_layers(ax, df, width=width, title=None if own else f"{what}\n{panel}", legend=not own)
        if own:  # the paper's layout: the kinds listed under the plot; both title lines centred on the figure
            figure_title(fig, f"{what}\n{panel}" + ("" if note is None else f"\n{note}"))
            kind_legend(fig, drawn, loc="outside lower center", ncol=4)
    return fig


def _side_by_side(traces: list[Trace], *, steps: list[Optional[int]], width: Optional[int],
                  fig: Optional[Figure], title: str) -> Figure:
    with style():
        # one y axis for both runs: their corrections are compared at a glance
        fig, axes = new_grid(fig, 1, len(traces), figsize=(6.5 * len(traces), 5.0), sharey=True)
        labels: list[str] = []
        for i, (ax, trace, n) in enumerate(zip(axes[0], traces, steps)):
            df = first_steps(trace, n)
            prefix = f"({'ab'[i]}) " if len(traces) > 1 else ""
            labels += _draw_layers(ax, df, width=width, title=f"{prefix}{run_label(df)}: {span_text(df, n)}",
                                   legend=False)[0]
        for ax in axes[0][1:]:
            ax.set_ylabel("")  # the shared axis is labelled once, on the left
        figure_title(fig, title)
        kind_legend(fig, labels, loc="outside lower center", ncol=4)
    return fig


def figure6(trace: Trace, trace2: Optional[Trace] = None, *, steps: Steps = 2000,
            width: Optional[int] = MEDIAN_WIDTH, fig: Optional[Figure] = None) -> Figure:
    """Figure 6 (paper, Appendix): Figure 5 median-filtered (width 51), two runs side by side.

    ``steps`` is one count for both traces or one per trace (the paper: 2000 at batch 8K, 500 at
    32K). Panels (a) and (b) share one legend of layer kinds under them. Raises
    :class:`~graftlab.errors.GraftlabError` when ``steps`` does not give one count per trace.
    """
    traces = _traces(trace, trace2)
    return _side_by_side(traces, steps=_per_trace(steps, len(traces)), width=width, fig=fig,
                         title=f"Figure 6: per-layer learning-rate corrections, {filter_text(width)}")


def figure7(trace: Trace, trace2: Optional[Trace] = None, *, width: Optional[int] = None,
            fig: Optional[Figure] = None) -> Figure:
    """Figure 7 (paper, Appendix): per-layer corrections over all recorded iterations, one panel per run.

    Unfiltered unless ``width`` is given, as in the paper.
    """
    traces = _traces(trace, trace2)
    return _side_by_side(traces, steps=[None] * len(traces), width=width, fig=fig,
                         title=f"Figure 7: per-layer learning-rate corrections over all iterations, "
                               f"{filter_text(width)}")
