"""Per-row ratios of a vocabulary trace against token frequency.

A trace recorded with ``granularity="vocab"`` holds one ratio per block of vocabulary rows of the
word embedding and the output layer. Rare tokens' rows get small gradients under SGD (the heavy
tail of Kunstner et al. 2024), so the implicit correction ``||M step|| / ||D step||`` that grafting
measures should grow as a token's frequency falls; this figure shows whether it does::

    from graftlab import plots
    plots.rows_figure("runs/gpt-vocab").savefig("rows.png")       # frequencies from the task's text
    plots.rows_figure(df, frequency=counts)                       # counts[token id] of your own data
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from graftlab.errors import GraftlabError
from graftlab.plots.common import KIND_LABELS, Trace, decade_axis, first_steps, kind_color, kind_legend, metadata, new_axes, style


def token_frequency(meta: dict) -> np.ndarray:
    """``counts[token id]`` over the training text of the built-in text task a trace was recorded on
    (``metadata["task"]`` ``gpt`` or ``bert``, with its ``config``). Raises GraftlabError for another task."""
    task_name = meta.get("task")
    cfg = meta.get("config") or {}
    if task_name not in ("gpt", "bert"):
        raise GraftlabError(f"token frequencies are known for the gpt and bert tasks only (this trace: "
                            f"{task_name!r}), which `graftlab plot --figure rows` needs; for another model's "
                            f"trace call graftlab.plots.rows_figure(trace, frequency=counts) with its counts per token id")
    import torch

    from graftlab.tasks import get_task

    task = get_task(task_name, size=cfg.get("size") or "tiny", data=cfg.get("data"), batch_size=1,
                    seed=int(cfg.get("seed") or 0), device="cpu")
    return torch.bincount(task.data.train.flatten(), minlength=task.config.vocab_size).numpy()


def row_ratios(trace: Trace, steps: Optional[int] = None) -> pd.DataFrame:
    """One row per vocabulary row block: ``group``, ``tensor``, ``kind``, ``first``, ``stop`` (rows
    ``first .. stop - 1``) and ``median`` (the median finite ratio over the first ``steps`` steps)."""
    from graftlab.graft.slicing import parse_group
    from graftlab.kinds import classify

    df = first_steps(trace, steps)
    ratio = df["ratio"].astype("float64")
    med = ratio[np.isfinite(ratio)].groupby(df["group"]).median()
    rows = []
    for g, m in med.items():
        parsed = parse_group(str(g))
        if parsed is not None and parsed[3] is not None:
            rows.append({"group": g, "tensor": parsed[0], "kind": classify(str(g)).kind,
                         "first": parsed[3][0], "stop": parsed[3][1], "median": float(m)})
    if not rows:
        raise GraftlabError("the trace has no per-row groups (record it with granularity='vocab')")
    return pd.DataFrame(rows)


def rows_figure(trace: Trace, *, frequency: Optional[Sequence[float]] = None, steps: Optional[int] = None,
                ax: Optional[Axes] = None, fig: Optional[Figure] = None) -> Figure:
    """Each row block's median ratio (first ``steps`` steps; all by default) against its tokens'
    mean frequency, log-log, one colour per kind (output layer, word embedding).

    ``frequency``: counts per token id (default: :func:`token_frequency` of the trace's task).
    Raises GraftlabError for a trace without per-row groups or a frequency table shorter than the rows.
    """
    table = row_ratios(trace, steps)
    if frequency is None:
        frequency = token_frequency(metadata(first_steps(trace, 1)))
    counts = np.asarray(frequency, dtype=np.float64)
    if len(counts) < int(table["stop"].max()):
        raise GraftlabError(f"frequency holds {len(counts)} tokens; the trace has rows up to {int(table['stop'].max())}")
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    table["frequency"] = (cum[table["stop"]] - cum[table["first"]]) / (table["stop"] - table["first"])
    with style():
        fig, ax = new_axes(ax, fig, figsize=(6.0, 4.5))
        for kind, part in table.groupby("kind", sort=False):
            ax.scatter(part["frequency"] + 1.0, part["median"], s=8, alpha=0.7, color=kind_color(kind))
        ax.set_xscale("log")
        ax.set_yscale("log")
        decade_axis(ax, "y")
        ax.set_xlabel("token frequency in the training text (+1; mean over the row block)")
        ax.set_ylabel("median ratio ||M step|| / ||D step||")
        ax.set_title("Per-row ratios against token frequency")
        kind_legend(ax, [KIND_LABELS[k] for k in dict.fromkeys(table["kind"])], ncol=1)
    return fig
