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
from graftlab.trace import PathLike, group_table, read_trace

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


def kinds_of(df: pd.DataFrame) -> pd.DataFrame:
    """Per group: ``kind``, ``ffn``, ``block``, ``numel`` from the metadata; unknown groups are ``other``."""
    meta = df.attrs.get("graftlab", {})
    table = group_table(meta)
    names = pd.unique(df["group"])
    out = pd.DataFrame(index=pd.Index(names, name="group"))
    for col, default in (("kind", "other"), ("ffn", None), ("block", None), ("numel", np.nan)):
        out[col] = table[col].reindex(names).to_numpy() if col in table else default
        out[col] = out[col].where(out[col].notna(), default)
    out["kind"] = [k if k in KINDS else "other" for k in out["kind"]]
    out["label"] = [KIND_LABELS[k] for k in out["kind"]]
    return out


def ratio_table(df: pd.DataFrame, column: str = "ratio") -> pd.DataFrame:
    """Steps x groups table of ``column`` in metadata group order; non-finite values become NaN."""
    wide = df.pivot_table(index="step", columns="group", values=column, aggfunc="first", sort=True)
    order = [g for g in pd.unique(df["group"]) if g in wide.columns]
    wide = wide[order].astype("float64")
    return wide.where(np.isfinite(wide))


def smooth(wide: pd.DataFrame, width: Optional[int]) -> pd.DataFrame:
    """Each column median-filtered with window ``width`` (the recorded samples; None: unchanged)."""
    if width is None or width <= 1:
        return wide
    from graftlab.analysis import median_filter

    return wide.apply(lambda col: pd.Series(median_filter(col.to_numpy(), width), index=col.index))


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


def new_axes(ax: Optional[Axes], fig: Optional[Figure], *, figsize=(7.0, 4.5)) -> tuple[Figure, Axes]:
    """The Axes to draw on: ``ax`` if given, else one new Axes on ``fig`` (or a new Figure)."""
    if ax is not None:
        return ax.figure, ax
    if fig is None:
        fig = plt.figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def new_grid(fig: Optional[Figure], nrows: int, ncols: int, *, figsize, **kwargs) -> tuple[Figure, np.ndarray]:
    if fig is None:
        fig = plt.figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def log_ratio_axis(ax: Axes, *, xlabel: str = "Training iterations") -> None:
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"$\|w_M - w_t\| \,/\, \|w_D - w_t\|$")


def kind_legend(ax_or_fig, labels: Sequence[str], **kwargs) -> None:
    """One legend entry per layer kind present, in the paper's order."""
    from matplotlib.lines import Line2D

    present = [lab for lab in LABEL_ORDER if lab in set(labels)]
    handles = [Line2D([], [], color=LABEL_COLORS[lab], lw=2) for lab in present]
    kwargs.setdefault("ncol", 2)
    kwargs.setdefault("fontsize", "small")
    kwargs.setdefault("frameon", True)
    ax_or_fig.legend(handles, present, **kwargs)


def plot_groups(ax: Axes, wide: pd.DataFrame, kinds: pd.DataFrame, *, lw: float = 0.8, alpha: float = 0.8) -> list[str]:
    """One line per group (NaNs dropped), coloured by kind, gid = group name; returns the labels drawn."""
    drawn = []
    for group in wide.columns:
        col = wide[group].dropna()
        if col.empty:
            continue
        label = kinds.at[group, "label"]
        ax.plot(col.index.to_numpy(), col.to_numpy(), color=LABEL_COLORS[label], lw=lw, alpha=alpha,
                gid=str(group))
        drawn.append(label)
    return drawn
