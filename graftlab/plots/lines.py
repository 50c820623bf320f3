"""The lines of the per-layer figures: one per group, or each layer kind's median and band past
:data:`MANY_GROUPS` groups.

At the paper's sizes (tens to a few hundred groups: a BERT's weights, biases and LayerNorms) every
group is its own line, so a reader can follow any one layer. Finer partitions (per row, per head)
and large models give 10^4 to 10^6 groups: their lines merge into one mass that shows nothing of a
single group, and each line costs about a millisecond to draw. There each layer kind is drawn as
its median over groups per step with a band holding the middle :data:`BAND` of its groups, and the
figure's title says so (:func:`band_text`).
"""
from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba

from graftlab.plots.common import DEGENERATE_LABEL, KIND_LABELS, LABEL_COLORS, LABEL_ORDER, metadata

MANY_GROUPS = 1000  # more groups than this: per-kind median and band instead of one line per group
BAND = (0.10, 0.90)  # the quantiles over a kind's groups that bound its band
DEGENERATE_COLOR = "0.35"
# LayerNorms and other small groups are drawn above the many block lines that would hide them
_ON_TOP = {KIND_LABELS["norm"]: 3.0}


def aggregated(n_groups: int) -> bool:
    """Whether a figure of ``n_groups`` lines draws per-kind medians and bands instead."""
    return n_groups > MANY_GROUPS


def band_text(n_groups: int, sep: str = ": ") -> str:
    """What an aggregated panel shows, for its title (``sep`` after the count of groups)."""
    lo, hi = (round(q * 100) for q in BAND)
    return f"{n_groups:,} groups{sep}per-kind median, {lo}-{hi}% band"


def _rows_of(df: pd.DataFrame, groups: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the rows of ``df`` whose group is in ``groups``, those rows' group names as str)."""
    col = df["group"]
    if isinstance(col.dtype, pd.CategoricalDtype):
        # one lookup per category, then the rows by their codes: no str per row
        codes = col.cat.codes.to_numpy()
        cats = pd.Index([str(c) for c in col.cat.categories], dtype=object)
        keep = np.append(cats.isin(groups), False)[codes]  # code -1 (missing) is the appended False
        return keep, cats.to_numpy()[codes[keep]]
    names = col.astype(str).to_numpy()
    keep = pd.Index(names).isin(groups)
    return keep, names[keep]


def degenerate_groups(df: pd.DataFrame, kinds: pd.DataFrame) -> set[str]:
    """The groups whose D step is float noise over the steps of ``df`` (the attention K biases of a
    BERT: their true gradient is zero), decided as ``distill`` decides them
    (:mod:`graftlab.distill.degenerate`): drawn with a mark of their own, since their ratio is
    an artifact, not a correction. ``kinds`` is :func:`graftlab.plots.common.kinds_of` of ``df``."""
    from graftlab.distill import degenerate

    shares = degenerate.gradient_shares(df)
    names = kinds.index
    share = (np.full(len(names), np.nan) if shares is None
             else shares.reindex(names).to_numpy(dtype=np.float64))
    # Without the outlier rule (off here) only two rules can call a group degenerate: a gradient share
    # under the noise bound (the largest is a gradient-free group's), or, where there is no share,
    # the key-bias structure (kind K). Medians are taken only for those groups and the weights they
    # are compared with: at 10^6 groups a median per group over every row is what costs.
    with np.errstate(invalid="ignore"):
        maybe = share < degenerate.noise_share(metadata(df).get("precision"), "gradient-free")
    maybe |= ~np.isfinite(share) & (kinds["kind"].to_numpy() == "K")
    if not maybe.any():
        return set()
    chosen = names[maybe]
    siblings = [s for g in chosen if (s := degenerate.sibling(g, names)) is not None]
    judged = chosen.append(pd.Index(siblings, dtype=object)).unique()
    keep, group = _rows_of(df, judged)
    r = df["ratio"].to_numpy(dtype=np.float64)[keep]
    ok = np.isfinite(r) & (r > 0)
    med = pd.Series(r[ok]).groupby(group[ok]).median()
    evidence = degenerate.assess(med, kinds["kind"].reindex(med.index),
                                 shares=None if shares is None else shares.reindex(med.index),
                                 precision=metadata(df).get("precision"))
    return set(evidence.degenerate)


def plot_groups(ax: Axes, wide: pd.DataFrame, kinds: pd.DataFrame, *, lw: float = 0.8, alpha: float = 0.8,
                degenerate: Iterable[str] = ()) -> list[str]:
    """One line per group (NaNs dropped), coloured by kind, gid = group name; returns the labels drawn.

    LayerNorm lines are drawn above the others; ``degenerate`` groups dotted and faint, with
    :data:`DEGENERATE_LABEL` among the labels returned (see :func:`~graftlab.plots.common.kind_handles`).
    A group of one finite value is a dot. Past :data:`MANY_GROUPS` groups, :func:`plot_bands`."""
    degenerate = set(degenerate)
    if aggregated(wide.shape[1]):
        return plot_bands(ax, wide, kinds, degenerate=degenerate)
    drawn = []
    for group in wide.columns:
        col = wide[group].dropna()
        if col.empty:
            continue
        label = kinds.at[group, "label"]
        odd = group in degenerate
        dot = {"marker": "o", "ms": 3} if len(col) == 1 else {}  # a line of one point draws nothing
        ax.plot(col.index.to_numpy(), col.to_numpy(), color=LABEL_COLORS[label], lw=lw,
                alpha=0.45 if odd else alpha, ls=":" if odd else "-", zorder=_ON_TOP.get(label, 2.0),
                gid=str(group), **dot)
        drawn.append(DEGENERATE_LABEL if odd else label)
        if odd:
            drawn.append(label)
    return drawn


def kind_quantiles(values: np.ndarray, labels: np.ndarray, order: Sequence[str]) -> dict[str, np.ndarray]:
    """Per label of ``order`` present in ``labels``: a (3, steps) array of the :data:`BAND` low
    quantile, the median and the high quantile over that label's columns of ``values`` (steps x
    groups; NaN skipped; NaN where a step has no value)."""
    out = {}
    for label in order:
        cols = labels == label
        if not cols.any():
            continue
        with warnings.catch_warnings():  # a step none of the kind's groups has: NaN, said by the gap
            warnings.simplefilter("ignore", RuntimeWarning)
            out[label] = np.nanquantile(values[:, cols], (BAND[0], 0.5, BAND[1]), axis=1)
    return out


def plot_bands(ax: Axes, wide: pd.DataFrame, kinds: pd.DataFrame, *, degenerate: Iterable[str] = ()) -> list[str]:
    """Per layer kind, its median over groups per step (gid ``median:<label>``) over a band from the
    :data:`BAND` quantiles (gid ``band:<label>``); returns the labels drawn.

    Degenerate groups stay out of their kind's band: as dotted lines of their own when they are
    few, else as one dotted grey median and band (:data:`DEGENERATE_LABEL`). A trace of one step
    gives each kind a dot and a bar, side by side."""
    degenerate = set(degenerate)
    x = wide.index.to_numpy(dtype=np.float64)
    labels = kinds["label"].reindex(wide.columns).to_numpy(dtype=object)
    odd = wide.columns.isin(list(degenerate)) if degenerate else np.zeros(wide.shape[1], dtype=bool)
    drawn: list[str] = []
    if odd.any() and not aggregated(int(odd.sum())):
        drawn += plot_groups(ax, wide.loc[:, odd], kinds, degenerate=degenerate)
        labels = np.where(odd, None, labels)
    else:
        labels = np.where(odd, DEGENERATE_LABEL, labels)
    stats = kind_quantiles(wide.to_numpy(dtype=np.float64), labels, (*LABEL_ORDER, DEGENERATE_LABEL))
    single = len(x) == 1
    shift = np.linspace(-0.3, 0.3, len(stats)) if single and len(stats) > 1 else np.zeros(len(stats))
    for dx, (label, (lo, med, hi)) in zip(shift, stats.items()):
        ok = np.isfinite(med)
        if not ok.any():
            continue
        noise = label == DEGENERATE_LABEL
        color = DEGENERATE_COLOR if noise else LABEL_COLORS[label]
        z = _ON_TOP.get(label, 2.0)
        if single:
            ax.vlines(x + dx, lo, hi, color=color, lw=5, alpha=0.35, zorder=1.5, gid=f"band:{label}")
            ax.plot(x + dx, med, ls="none", marker="_" if noise else "o", ms=6, color=color, zorder=z,
                    gid=f"median:{label}")
        else:
            # a faint fill with its edges drawn: bands of several kinds overlap and stay told apart
            ax.fill_between(x, lo, hi, where=ok, facecolor=to_rgba(color, 0.1), edgecolor=to_rgba(color, 0.6),
                            lw=0.6, zorder=1.5, gid=f"band:{label}")
            ax.plot(x[ok], med[ok], color=color, lw=1.6, ls=":" if noise else "-", zorder=z, gid=f"median:{label}")
        drawn.append(label)
    return drawn


def x_span(ax: Axes, steps: pd.Index) -> None:
    """The x axis over ``steps`` (the iterations drawn); one step gets a unit-wide view ticked at it."""
    lo, hi = steps.min(), steps.max()
    if lo == hi:
        ax.set_xlim(lo - 0.5, hi + 0.5)
        ax.set_xticks([lo])
    else:
        ax.set_xlim(lo, hi)
