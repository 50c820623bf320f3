"""Distilled corrections as a bar chart: each group's median ratio and the factor it was rounded to.

The chart to look at before training with a corrections file (the paper's Table 5, drawn)::

    from graftlab import plots
    plots.corrections_bars("trace_bs32", window=2000, round="D10").savefig("corrections.png")
    plots.corrections_bars("trace_bs32.corrections.json")        # an existing corrections file
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from graftlab.errors import GraftlabError
from graftlab.kinds import KIND_LABELS, KINDS
from graftlab.plots.common import LABEL_COLORS, Trace, kind_legend, style
from graftlab.plots.lines import BAND, aggregated, band_text

Source = Union[Trace, "Corrections"]  # noqa: F821


def corrections_table(source: Source, *, window: Optional[int] = None, round: str = "none",
                      filter: Optional[int] = None) -> pd.DataFrame:
    """One row per group: ``group``, ``kind``, ``median``, ``factor``, ``flags``, ``later_median``, ``tied``.

    ``source`` is a :class:`~graftlab.corrections.Corrections`, a corrections JSON file, or a trace
    (distilled here with ``window``, ``round`` and ``filter`` as ``graftlab distill`` does).
    """
    return _table(_corrections(source, window=window, round=round, filter=filter))


def _corrections(source: Source, *, window: int, round: str, filter: Optional[int]):
    from graftlab.corrections import Corrections, load_corrections

    if isinstance(source, Corrections):
        corr = source
    elif isinstance(source, pd.DataFrame):
        raise GraftlabError("the corrections chart needs a trace path, a corrections file or a Corrections object")
    elif Path(source).is_file() and Path(source).suffix == ".json":
        corr = load_corrections(source)
    else:
        from graftlab.distill.pipeline import distill

        corr = distill(source, window=window, round=round, filter=filter)
    return corr


def _table(corr) -> pd.DataFrame:
    table = corr.summary()
    info = corr.source.get("groups") or {}
    table["later_median"] = [(info.get(g) or {}).get("later_median") for g in table["group"]]
    table["tied"] = [bool((info.get(g) or {}).get("tied")) for g in table["group"]]
    for col in ("median", "factor", "later_median"):
        table[col] = pd.to_numeric(table[col], errors="coerce").astype("float64")
    if corr.schedule and table["factor"].isna().all():
        # a schedule: show each group's first factor
        table["factor"] = [float(corr.schedule[g][0][1]) if g in corr.schedule else math.nan for g in table["group"]]
    table["kind"] = [k if k in KINDS else "other" for k in table["kind"]]
    table["flags"] = table["flags"].fillna("").astype(str)
    return table


def corrections_bars(source: Source, *, window: Optional[int] = None, round: str = "none", filter: Optional[int] = None,
                     ax: Optional[Axes] = None, fig: Optional[Figure] = None) -> Figure:
    """Per group: the median ratio (bar, coloured by kind) and the factor (dark bar), log scale,
    titled with the trace, the steps of the medians and the rounding.

    Flagged groups (degenerate, no finite ratio, ...) are hatched and named with their flag: their
    factor is a stand-in, not their own median.
    """
    corr = _corrections(source, window=window, round=round, filter=filter)
    table = _table(corr)
    if table.empty:
        raise GraftlabError("no groups to chart")
    many = aggregated(len(table))
    if many:  # a bar per group past a thousand is a wall of ticks: one bar per kind, with its range
        title_groups = len(table)
        table = per_kind(table)
    n = len(table)
    with style():
        if ax is None:
            import matplotlib.pyplot as plt

            fig = fig or plt.figure(figsize=(8, (1.6 if many else 1.2) + 0.24 * n), layout="constrained")
            ax = fig.add_subplot()
        fig = ax.figure
        y = np.arange(n)[::-1].astype(float)  # first group at the top
        colors = [LABEL_COLORS[KIND_LABELS[k]] for k in table["kind"]]
        med = table["median"].to_numpy()
        fac = table["factor"].to_numpy()
        finite = np.concatenate([med[np.isfinite(med) & (med > 0)], fac[np.isfinite(fac) & (fac > 0)]])
        lo = float(finite.min()) / 3 if finite.size else 1e-3
        ax.set_xscale("log")
        hatches = ["//" if f else None for f in table["flags"]]
        # bars run from the axis' left edge to the value (a log axis has no zero)
        ax.barh(y + 0.2, np.nan_to_num(med, nan=lo) - lo, height=0.4, left=lo, color=colors, hatch=hatches,
                edgecolor="white", gid="median", label="median")
        rounded = str(corr.source.get("round") or "none").lower() != "none"
        factor_label = "rounded factor" if rounded else "factor (the median, not rounded)"
        ax.barh(y - 0.2, np.nan_to_num(fac, nan=lo) - lo, height=0.4, left=lo, color="0.15", gid="factor",
                label=factor_label)
        if many:  # the middle of each kind's groups
            for col, dy in (("median", 0.2), ("factor", -0.2)):
                v, a, b = (table[c].to_numpy() for c in (col, f"{col}_lo", f"{col}_hi"))
                ok = np.isfinite(v) & np.isfinite(a) & np.isfinite(b)
                ax.errorbar(v[ok], y[ok] + dy, xerr=[v[ok] - a[ok], b[ok] - v[ok]], fmt="none", ecolor="0.45",
                            elinewidth=1, capsize=2, gid=f"{col} range")
        labels = [g + (f"  [{f}]" if f else "") for g, f in zip(table["group"], table["flags"])]
        ax.set_yticks(y, labels, fontsize="x-small")
        ax.set_ylim(-0.7, n - 0.3)
        ax.set_xlim(left=lo)
        ax.set_xlabel(r"correction on D's learning rate ($\|w_M - w_t\| / \|w_D - w_t\|$)")
        kind_legend(ax.figure, [KIND_LABELS[k] for k in table["kind"]], loc="outside lower center", ncol=4,
                    fontsize="x-small")
        from matplotlib.patches import Patch

        ax.figure.legend([Patch(color="0.6"), Patch(color="0.15")], ["median (colour: layer kind)", factor_label],
                         loc="outside upper right", fontsize="x-small", ncol=2)
        title = chart_title(corr.source)
        ax.set_title(title + (f"\n{band_text(title_groups, ' as ')} (bars: medians over groups)" if many else ""),
                     fontsize="small", loc="center")
    return fig


def per_kind(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`corrections_table` rows summarised per layer kind: ``median`` (over the kind's unflagged
    groups with a finite median) and ``factor`` (over all its groups), each with ``_lo``/``_hi`` at
    the :data:`~graftlab.plots.lines.BAND` quantiles; ``group`` names the kind and its counts."""
    rows = []
    for kind in [k for k in KINDS if k in set(table["kind"])]:
        t = table[table["kind"] == kind]
        ok = t["median"].to_numpy()[(t["flags"] == "").to_numpy()]
        ok = ok[np.isfinite(ok) & (ok > 0)]
        fac = t["factor"].to_numpy()
        fac = fac[np.isfinite(fac) & (fac > 0)]
        flagged = int((t["flags"] != "").sum())
        row = {"group": f"{KIND_LABELS[kind]} ({len(t):,} groups{f', {flagged:,} flagged' if flagged else ''})",
               "kind": kind, "flags": ""}
        for col, v in (("median", ok), ("factor", fac)):
            q = np.quantile(v, [0.5, *BAND]) if v.size else [math.nan] * 3
            row.update({col: float(q[0]), f"{col}_lo": float(q[1]), f"{col}_hi": float(q[2])})
        rows.append(row)
    return pd.DataFrame(rows)


def chart_title(src: dict) -> str:
    """What the chart shows: the trace, the steps the medians cover and the rounding."""
    trace = Path(str(src.get("trace") or "corrections")).name
    start, window = src.get("start") or 0, src.get("window")
    if src.get("mode") == "schedule":
        steps = f"schedule, windows of {window} steps (first window shown)"
    else:
        steps = f"median over steps {start}..{start + window - 1}" if window else "medians"
    rnd = str(src.get("round") or "none")
    rounding = "not rounded" if rnd.lower() == "none" else f"rounded {rnd}"
    return f"Corrections from {trace}: {steps}, {rounding}" + (f", filter {src['filter']}" if src.get("filter") else "")
