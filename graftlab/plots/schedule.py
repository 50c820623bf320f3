"""The paper's Figure 4: a learning-rate schedule discovered by global grafting.

A global M#D trace (one group, ``global``) holds M's learning rate per step (the ``lr`` column) and
the ratio ``||w_M - w_t|| / ||w_D - w_t||``: the factor D's step was rescaled by, i.e. the schedule D
would need to take M's steps::

    from graftlab import plots
    plots.figure4("sgd_adagrad_trace").savefig("fig4.png")
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from graftlab.errors import GraftlabError
from graftlab.plots.common import (
    MEDIAN_WIDTH,
    Trace,
    decade_axis,
    figure_title,
    filter_text,
    load,
    new_axes,
    optimizer_name,
    run_label,
    smooth,
    style,
)


def steps_per_epoch(meta: dict[str, Any]) -> Optional[int]:
    """Steps per training epoch from a trace's metadata, where the recorder stored it."""
    for where in (meta, meta.get("config") or {}, meta.get("task_info") or {}):
        if not isinstance(where, dict):
            continue
        value = where.get("steps_per_epoch")
        if value:
            return int(value)
        if where.get("train_size") and meta.get("batch_size"):
            return int(np.ceil(where["train_size"] / meta["batch_size"]))
    return None


def schedule(trace: Trace, *, width: Optional[int] = MEDIAN_WIDTH) -> pd.DataFrame:
    """Figure 4's data, indexed by step: M's ``lr`` and the ``correction`` (ratio, median-filtered)."""
    df = load(trace)
    groups = pd.unique(df["group"])
    if len(groups) != 1:
        raise GraftlabError(f"figure 4 needs a global trace (one group); this one has {len(groups)} groups")
    if "lr" not in df.columns:
        raise GraftlabError("figure 4 needs the magnitude optimizer's learning rate (an 'lr' column) in the trace")
    df = df.sort_values("step")
    ratio = df.set_index("step")["ratio"].astype("float64")
    # a step where M's lr was 0 (a warmup from 0) has ratio 0: neither belongs on the log axis
    ratio = ratio.where(np.isfinite(ratio) & (ratio > 0))
    correction = smooth(ratio.to_frame(), width).iloc[:, 0]
    lr = df.set_index("step")["lr"].astype("float64")
    return pd.DataFrame({"lr": lr.where(lr > 0), "correction": correction})


def figure4(trace: Trace, *, per_epoch: Optional[int] = None, width: Optional[int] = MEDIAN_WIDTH,
            ax: Optional[Axes] = None, fig: Optional[Figure] = None) -> Figure:
    """Figure 4 (paper, Section 5): M's learning-rate schedule and the correction grafting discovered for D.

    Both on one log axis (M's ``lr`` column and D's correction, the ratio ``||w_M - w_t|| / ||w_D -
    w_t||`` median-filtered with ``width``; None or 1: unfiltered) against epochs. ``per_epoch``
    (steps per epoch) defaults to the one the trace's metadata records; without it the x axis is in
    iterations. Raises :class:`~graftlab.errors.GraftlabError` for a trace with more than one group
    or without an ``lr`` column.
    """
    df = load(trace)
    data = schedule(df, width=width)
    meta = df.attrs.get("graftlab", {})
    per_epoch = per_epoch or steps_per_epoch(meta)
    x = data.index.to_numpy(dtype="float64")
    xlabel = "Training iterations"
    if per_epoch:
        x = x / per_epoch
        xlabel = "Training epochs"
    m = optimizer_name(meta, "magnitude", "M")
    d = optimizer_name(meta, "direction", "D")
    what = f"Figure 4: a learning-rate schedule for {d} discovered by grafting"
    run = run_label(df)
    with style():
        own = ax is None
        fig, ax = new_axes(ax, fig)
        ok = data["lr"].notna().to_numpy()
        ax.plot(x[ok], data["lr"].to_numpy()[ok], lw=2, label=f"lr schedule for {m}", gid="lr")
        ok = data["correction"].notna().to_numpy()
        ax.plot(x[ok], data["correction"].to_numpy()[ok], lw=1.5, label=f"correction for {d}, {filter_text(width)}",
                gid="correction")
        ax.set_xlabel(xlabel)
        ax.set_xlim(x.min(), x.max())
        decade_axis(ax)
        ax.set_ylabel(f"{m}'s learning rate; {d}'s correction", fontsize="small")
        ax.legend(loc="best")
        if own:  # both lines centred on the figure, not the second on the axes beside the y label
            figure_title(fig, f"{what}\n{run}")
        else:
            ax.set_title(f"{what}\n{run}")
    return fig
