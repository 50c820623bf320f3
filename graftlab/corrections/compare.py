"""Corrections files side by side: each group's (or kind's) factor, median and drift per file.

    from graftlab.corrections import compare
    compare("bs16.corrections.json", "bs64.corrections.json")            # one row per group
    compare("bs16.corrections.json", by="kind")                         # one row per layer kind

What ``graftlab show`` prints. The drift is the later-window median over the first-window median
that :func:`graftlab.distill.pipeline.distill` records (``source["groups"][g]["drift"]``): how far the
ratios moved between the window the factors come from and the end of the trace (Section 5 of the
paper distills the first window only).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from graftlab.corrections.files import Corrections, load_corrections
from graftlab.corrections.group_sources import GroupSource
from graftlab.errors import GraftlabError

Source = Union[Corrections, str, os.PathLike]
FIELDS = ("factor", "last", "median", "drift")


def _label(source: Source, i: int) -> str:
    return Path(source).name.removesuffix(".json") if isinstance(source, (str, os.PathLike)) else "ABCDEFGH"[i % 8]


def _rows(corr: Corrections) -> pd.DataFrame:
    """One row per group: kind, factor (static, or the schedule's first piece), last schedule
    factor (NaN for a static factor), first-window median and drift."""
    info = corr.group_sources
    rows = []
    for g in corr.groups:
        d = info.get(g) or GroupSource()
        pieces = corr.schedule.get(g) or []
        static = corr.multipliers.get(g)
        factor = static if static is not None else (pieces[0][1] if pieces else math.nan)
        rows.append({"group": g, "kind": d.kind, "factor": float(factor),
                     "last": float(pieces[-1][1]) if pieces and static is None else math.nan,
                     "median": math.nan if d.median is None else float(d.median),
                     "drift": math.nan if d.drift is None else float(d.drift), "flagged": bool(d.flags)})
    return pd.DataFrame(rows, columns=["group", "kind", *FIELDS, "flagged"]).set_index("group")


def compare(*sources: Source, labels: Optional[Sequence[str]] = None, by: str = "group") -> pd.DataFrame:
    """Corrections files (or :class:`Corrections`) side by side.

    ``by="group"``: one row per group of any file (the first file's order, then the others'), a
    ``kind`` column, then per file ``factor <label>`` (the static multiplier, or a schedule's first
    factor), ``last <label>`` (a schedule's last factor; NaN for static factors), ``median <label>``
    (first-window median ratio ``||M step|| / ||D step||``) and ``drift <label>`` (later-window
    median / first-window median; NaN where the trace held one window). A group a file lacks is NaN
    in its columns. With two files, ``factor ratio`` is the second file's factor over the first's.
    ``by="kind"``: the same columns, each the median over the unflagged groups of a kind that every
    file holds, so each file's medians cover the same groups (``groups``: how many; ``flagged``: how
    many were left out because a file flags them, e.g. a degenerate K bias whose own median is no
    ratio of two learning rates and whose factor is a stand-in; with several files ``partial``: how
    many were left out because some file lacks them); ``factor ratio`` is the row's second factor
    over its first. Columns that are NaN for every row are left out. ``labels`` default to the file names
    (``A``, ``B``, ... for objects).

    Raises :class:`~graftlab.errors.GraftlabError` with no source, a bad ``by`` or ``labels`` of the
    wrong length or repeated, and whatever :func:`load_corrections` raises for a bad file.
    """
    if not sources:
        raise GraftlabError("compare needs at least one corrections file")
    if by not in ("group", "kind"):
        raise GraftlabError(f"{{by}} must be 'group' or 'kind', not {by!r}", param="by")
    labels = list(labels) if labels is not None else [_label(s, i) for i, s in enumerate(sources)]
    if len(labels) != len(sources) or len(set(labels)) != len(labels):
        labels = [f"{lab} ({i + 1})" for i, lab in enumerate(labels)] if len(labels) == len(sources) else None
        if labels is None:
            raise GraftlabError(f"labels must give one name per corrections file ({len(sources)})")
    tables = [_rows(s if isinstance(s, Corrections) else load_corrections(s)) for s in sources]
    order = list(dict.fromkeys(g for t in tables for g in t.index))
    kinds = pd.Series({g: next(t.at[g, "kind"] for t in tables if g in t.index) for g in order}, dtype=object)
    out = pd.DataFrame({"kind": kinds}, index=pd.Index(order, name="group"))
    for lab, t in zip(labels, tables):
        for f in FIELDS:
            out[f"{f} {lab}"] = t[f].reindex(order).to_numpy(dtype=float)
    if len(tables) == 2:
        out["factor ratio"] = out[f"factor {labels[1]}"] / out[f"factor {labels[0]}"]
    if by == "kind":
        flagged = pd.Series(False, index=out.index)
        held = pd.Series(True, index=out.index)
        for t in tables:  # flagged in any file or missing from one: every file's medians then cover the same groups
            flagged |= t["flagged"].reindex(order, fill_value=False).to_numpy(dtype=bool)
            held &= out.index.isin(t.index)
        kinds, used = out["kind"], held & ~flagged
        out = out.drop(columns="kind")[used].groupby(kinds[used], sort=False).median().reindex(pd.unique(kinds))
        if len(tables) == 2:  # of the medians, as the row shows them (a median of ratios is another number)
            out["factor ratio"] = out[f"factor {labels[1]}"] / out[f"factor {labels[0]}"]
        out.index.name = "kind"

        def count(mask: pd.Series) -> pd.Series:
            return mask.groupby(kinds, sort=False).sum().reindex(out.index).astype(int)

        out.insert(0, "groups", count(used))
        out.insert(1, "flagged", count(flagged & held))
        if len(tables) > 1:
            out.insert(2, "partial", count(~held))
    keep = [c for c in out.columns
            if c in ("kind", "groups", "flagged", "partial") or not np.isnan(out[c].to_numpy(dtype=float)).all()]
    return out[keep]
