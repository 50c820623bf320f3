"""Distill a trace into corrections: windowed medians of the per-group ratios (Section 5).

    from graftlab.distill import distill
    from graftlab.corrections import save
    corr = distill("runs/bert.trace", window=2000, round="D500")   # static per-group multipliers
    save(corr, "runs/bert.corrections.json")
    print(corr.summary())                                          # median, factor, drift, flags

- Static mode (default for layer/custom traces): the median of each group's ratios over steps
  ``[start, start + window)``, optionally median-filtered first and rounded, becomes the group's
  multiplier. Only the part files and row groups holding those steps are read.
- Schedule mode (default for global traces): medians over consecutive windows of the whole trace
  become piecewise-constant ``[[start, factor], ...]`` schedules per group.

Flagged groups (no finite ratio, zero M step, or degenerate: see
:func:`graftlab.analysis.flag_groups`) do not use their own median: they get the median of the
unflagged groups of their kind, or 1.0 where there is none, before rounding.

Drift: when the trace holds at least two windows, the median over its last ``window`` steps is
divided by the first window's median (``drift``), so overshooting static corrections show.
"""
from __future__ import annotations

import fnmatch
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from graftlab import analysis, degenerate
from graftlab.corrections import Corrections
from graftlab.errors import GraftlabError
from graftlab.trace import PART_GLOB, REQUIRED, group_table, read_metadata, read_trace

PathLike = Union[str, os.PathLike]


def trace_extent(path: PathLike) -> tuple[int, int]:
    """``(first_step, last_step)`` of a trace from Parquet footers only (no data pages read)."""
    from graftlab import foreign

    if foreign.is_foreign(path):
        return foreign.extent(path)
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        # sorting names, not Path objects: a long run has thousands of parts
        files = [path / n for n in sorted(n for n in os.listdir(path) if fnmatch.fnmatchcase(n, PART_GLOB))]
    else:
        raise GraftlabError(f"{path}: no such trace")
    if not files:
        raise GraftlabError(f"{path}: the trace is empty (no part files)")
    try:
        names = pq.read_schema(files[0]).names
    except (pa.ArrowInvalid, OSError) as err:
        raise GraftlabError(f"{files[0]}: not a readable Parquet file ({err})") from None
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise GraftlabError(f"{path}: trace lacks required column(s) {', '.join(missing)}")
    lo: Optional[int] = None
    hi: Optional[int] = None
    for order, pick in ((files, "min"), (files[::-1], "max")):
        for f in order:
            v = _step_stat(f, pick)
            if v is not None:
                if pick == "min":
                    lo = v
                else:
                    hi = v
                break
    if lo is None or hi is None:
        raise GraftlabError(f"{path}: the trace is empty (no recorded steps)")
    return lo, hi


def _step_stat(f: Path, pick: str) -> Optional[int]:
    try:
        md = pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as err:
        raise GraftlabError(f"{f}: not a readable Parquet file ({err})") from None
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    if "step" not in names or md.num_rows == 0:
        return None
    col = names.index("step")
    vals = []
    for rg in range(md.num_row_groups):
        r = md.row_group(rg)
        if r.num_rows == 0:
            continue
        st = r.column(col).statistics
        if st is None or not st.has_min_max:
            steps = pq.read_table(f, columns=["step"]).column("step").to_numpy()
            return int(steps.min() if pick == "min" else steps.max()) if steps.size else None
        vals.append(st.min if pick == "min" else st.max)
    return int(min(vals) if pick == "min" else max(vals)) if vals else None


def _direction_lr(meta: dict[str, Any]) -> Optional[float]:
    hp = ((meta.get("direction") or {}).get("hyperparameters") or {})
    lr = hp.get("lr")
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def distill(
    trace_path: PathLike,
    *,
    window: int = 2000,
    round: str = "none",
    schedule: Optional[bool] = None,
    filter: Optional[int] = None,
    tie: Optional[str] = None,
    start: int = 0,
    outlier: Optional[float] = None,
    drift: bool = True,
) -> Corrections:
    """Distill ``trace_path`` into :class:`~graftlab.corrections.Corrections` (see module doc).

    ``round`` is ``none``, ``pow10`` or ``D<beta>``; ``filter`` an odd median-filter width applied
    to each group's series first; ``tie`` a regex of group names D_beta ties to beta (default: the
    groups inside transformer blocks); ``outlier`` the opt-in ratio-outlier factor that also flags
    groups degenerate (None: off; :mod:`graftlab.degenerate` decides from the steps themselves).
    """
    analysis.parse_round(round)  # bad specs fail before any reading
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise GraftlabError(f"window must be a positive number of steps, got {window!r}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise GraftlabError(f"start must be a step number >= 0, got {start!r}")
    if filter is not None and filter != 0:
        analysis.median_filter([], filter)  # validates the width
    path = Path(trace_path)
    meta = read_metadata(path)
    first, last = trace_extent(path)
    every = meta.get("every") if isinstance(meta.get("every"), int) and meta.get("every") > 0 else 1
    length = last + every
    if schedule is None:
        schedule = meta.get("granularity") == "global"
    if start + window > length:
        raise GraftlabError(
            f"{path}: window of {window} steps from step {start} is longer than the trace "
            f"({length} steps: {first}..{last})"
        )
    table = group_table(meta)

    # read_trace opens only the part files and row groups that can hold the steps asked for
    df = read_trace(path, steps=(start, None if schedule else start + window))
    df.attrs = {}  # pandas deep-copies attrs on every operation; the metadata is in ``meta``
    if df.empty:
        raise GraftlabError(f"{path}: the trace has no rows in steps {start}..{start + window - 1}")
    present = analysis._group_order(df)
    known = set(table.index)
    groups = [g for g in table.index if g in set(present)] + [g for g in present if g not in known]
    kinds = analysis.group_kinds(groups, table)
    tied = analysis.tied_groups(groups, table, tie)

    if filter:  # once, over everything read: windows then see the filtered series
        df = analysis.filter_groups(df, filter)
    first_win = analysis.window_medians(df, window, start).set_index("group").reindex(groups)
    in_window = df[(df["step"] >= start) & (df["step"] < start + window)]
    flags, evidence, method = degenerate.flag_window(in_window, first_win["median"], kinds, outlier)
    later = pd.Series(math.nan, index=groups)
    later_start = None
    if drift and length - start >= 2 * window:
        later_start = length - window
        if schedule:
            tail = df
        else:
            tail = read_trace(path, steps=(later_start, None))
            tail = analysis.filter_groups(tail, filter) if filter else tail
        later = analysis.window_medians(tail, window, later_start).set_index("group").reindex(groups)["median"]

    def factors(medians: pd.Series) -> pd.Series:
        # NaN where a window gives an unflagged group no usable median (the schedule carries over).
        usable = analysis.fallback_factors(medians, kinds, flags)
        ok = np.isfinite(usable) & (usable > 0)
        out = pd.Series(math.nan, index=usable.index)
        out[ok] = analysis.apply_round(usable[ok], round, tied[ok])
        return out

    multipliers: dict[str, float] = {}
    sched: dict[str, list[list]] = {}
    if schedule:
        wins = analysis.windowed_medians(df, window, start)
        rows = []
        for s, part in wins.groupby("start", sort=True):
            med = part.set_index("group")["median"].reindex(groups)
            # A window where a group has no finite ratio keeps the previous factor (piecewise).
            f = factors(med)
            rows.append(pd.DataFrame({"start": s, "group": groups, "factor": f.to_numpy()}))
        sched = analysis.piecewise(pd.concat(rows, ignore_index=True), "factor")
        for g in groups:  # groups with no finite ratio anywhere: their fallback factor throughout
            if g not in sched:
                sched[g] = [[0, float(factors(first_win["median"])[g])]]
        first_factor = pd.Series({g: sched[g][0][1] for g in groups})
    else:
        first_factor = factors(first_win["median"])
        multipliers = {g: float(first_factor[g]) for g in groups}

    stand_in = analysis.fallback_factors(first_win["median"], kinds, flags)
    info = {}
    for g in groups:
        d = {
            "kind": kinds[g],
            "block": _block(table["block"].get(g)) if "block" in table.columns and g in table.index else None,
            "tied": bool(tied[g]),
            "median": _py(first_win.at[g, "median"]),
            "factor": _py(first_factor[g]),
            "n_finite": int(first_win.at[g, "n_finite"]),
            "n_nonfinite": int(first_win.at[g, "n_nonfinite"]),
            "later_median": _py(later[g]),
            "drift": _py(later[g] / first_win.at[g, "median"]) if first_win.at[g, "median"] > 0 else None,
            "flags": flags[g],
        }
        d["grad_share"] = _py(evidence[g].grad_share)
        if flags[g]:
            d["stand_in"] = _py(stand_in[g])
        if evidence[g].degenerate:
            d["evidence"] = evidence[g].to_dict()
        if "members" in table.columns and g in table.index:
            members = table.at[g, "members"]
            if isinstance(members, (list, tuple)) and list(members) != [g]:
                d["members"] = [str(m) for m in members]
        info[g] = d
    source = {
        "trace": str(path.resolve()),
        "window": int(window),
        "start": int(start),
        "steps": [int(first), int(last)],
        "later_window_start": later_start,
        "mode": "schedule" if schedule else "static",
        "round": str(round),
        "filter": int(filter) if filter else None,
        "tie": tie,
        "outlier": outlier,
        "flagged": {g: flags[g] for g in groups if flags[g]},
        "degenerate": method,
        "fallback": "median of the unflagged groups of the same kind, else 1.0",
        "direction_lr": _direction_lr(meta),
        "metadata": {k: v for k, v in meta.items() if k != "groups"},
        "groups": info,
    }
    return Corrections(multipliers=multipliers, schedule=sched, source=source)


def _py(v: Any) -> Any:
    if v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _block(v: Any) -> Optional[int]:
    """A block index from the metadata table (pandas turns int columns with None into floats)."""
    v = _py(v)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def default_output(trace_path: PathLike, format: str = "json") -> Path:
    """Where ``graftlab distill`` writes by default: ``<trace>.corrections.<format>`` beside it."""
    p = Path(os.path.normpath(str(trace_path)))
    return p.with_name(p.name + f".corrections.{format}")
