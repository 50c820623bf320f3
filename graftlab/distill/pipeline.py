"""Distill a trace into corrections: windowed medians of the per-group ratios (Section 5).

    from graftlab.distill.pipeline import distill
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
:func:`graftlab.distill.degenerate.flag_groups`) do not use their own median: they get the median of the
unflagged groups of their kind, or 1.0 where there is none, before rounding.

Drift: when the trace holds at least two windows, the median over its last ``window`` steps is
divided by the first window's median (``drift``), so overshooting static corrections show.

Divergence: windows holding steps at or after a divergence (non-finite ``norm_m``/``norm_d``, or
``restart`` marks; see :mod:`graftlab.distill.divergence`) are refused by name unless
``allow_divergence=True``; the drift window then ends where the divergence begins.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from graftlab.distill import analysis, degenerate, idle, notes as distill_notes, divergence, medians
from graftlab.distill.records import group_records
from graftlab.corrections import Corrections
from graftlab.errors import GraftlabError
from graftlab.trace import gaps, group_table, read_metadata, read_trace, trace_extent
from graftlab.trace.scanning import open_parts

PathLike = Union[str, os.PathLike]

FALLBACK = "median of the unflagged groups of the same kind, else 1.0"


def distill(
    trace_path: PathLike,
    *,
    window: Optional[int] = None,
    round: str = "none",
    schedule: Optional[bool] = None,
    filter: Optional[int] = None,
    tie: Optional[str] = None,
    start: int = 0,
    outlier: Optional[float] = None,
    drift: bool = True,
    allow_divergence: bool = False,
) -> Corrections:
    """Distill the trace at ``trace_path`` into :class:`~graftlab.corrections.Corrections`.

    The paper's Section 5: each group's factor is the median of its ratios ``||w_M - w_t|| /
    ||w_D - w_t||`` (dimensionless) over the ``window`` steps from ``start`` (the paper: the first
    2000 steps at batch 8K, 500 at 32K; Table 5), skipping non-finite ratios. ``window=None`` takes
    the paper's 2000 capped to the first quarter of the trace (:func:`default_window`), so a short
    trace distills too; ``source["window"]`` holds the window used. ``round`` is
    ``"none"``, ``"pow10"`` (down to a power of ten) or ``"D<beta>"`` (the paper's D_beta of Table
    6b: groups inside transformer blocks, or those matching the ``tie`` regex, become beta; the rest
    go down to a power of ten within {0.1, 1, 10, 100}). ``filter`` is an odd median-filter width
    applied to each group's series first (the figures use 51; None, 0 or 1: none); ``outlier`` an opt-in ratio
    threshold that also flags groups degenerate (None: off; :mod:`graftlab.distill.degenerate` decides from
    what D's steps are made of, and its evidence goes into each flagged group's record). ``schedule=True`` gives
    piecewise-constant schedules from consecutive windows over the whole trace (Figure 4) instead of
    static multipliers; the default is a schedule for a global trace. ``drift`` adds each group's
    median over the trace's last window. ``allow_divergence`` distills windows that follow a
    divergence instead of refusing them (``source["divergence"]`` records what was found).

    Returns corrections with one multiplier (or one schedule) per group, relative to D's recorded
    learning rate (``source["direction_lr"]``), and one
    :class:`~graftlab.corrections.GroupSource` per group in ``source["groups"]`` (median, counts,
    drift, flags). Reads only the part files the windows need.

    Raises :class:`~graftlab.errors.GraftlabError` for a bad ``window``, ``start``, ``round`` or
    ``filter``, a path that is not a readable graftlab trace, a window that does not fit in it, or
    windows that follow a divergence (unless ``allow_divergence``).
    """
    check_settings(window, start, round, filter, outlier, tie)
    path = Path(trace_path)
    meta, extent, length, window = _fit(path, window, start)
    if schedule is None:
        schedule = meta.get("granularity") == "global"
    table = group_table(meta)

    foreign = bool(meta.get("foreign"))
    # read_trace opens only the part files and row groups that can hold the steps asked for; a
    # schedule over a whole trace (recorded, or a table another tool wrote) streams its ratios into
    # a (groups, steps) grid instead of rows, and reads rows only for the first window's checks
    whole = bool(schedule)
    idle_seen: list[int] = []
    df = _read(path, start, start + window, None if whole else filter, idle_seen)
    if df.empty:
        held = f"; it holds steps {extent[0]}..{extent[1]}: pass {{start={extent[0]}}}" if extent[0] > start else ""
        raise GraftlabError(f"{path}: the trace has no rows in steps {start}..{start + window - 1}{held}",
                            param="start")
    grid = None
    if whole:  # the grid holds every step from start on (the rows only the first window's)
        grid, grid_idle = _ratio_grid(path, start, filter)
        idle_seen = sorted(set(idle_seen) | set(grid_idle.tolist()))
    # a divergence before or inside the windows: the prefix is read only when a window starts late
    marks = (divergence.scan(path) if whole
             else divergence.merge(divergence.find(df, foreign), _prefix_marks(path, start, foreign)))
    windows = ([(s, min(s + window, length)) for s in range(start, length, window)] if schedule
               else [(start, start + window)])
    _check_gaps(path, windows, foreign)
    late = divergence.check_windows(path, marks, windows, allow_divergence)
    groups = _groups(grid.groups if whole else analysis.group_order(df), table)
    kinds = analysis.group_kinds(groups, table)
    tied = analysis.tied_groups(groups, table, tie)
    notes = distill_notes.settings(path, round, tie, tied, filter, window)
    if analysis.parse_round(round)[0] == "dbeta_attn":  # DA<beta>: tie the attention weight matrices only
        tied = tied & analysis.attention_weights(groups, kinds)
    rule = _Rule(round, kinds, tied)
    first_win = (_grid_window(grid, start, start + window) if whole
                 else analysis.window_medians(df, window, start).set_index("group")).reindex(groups)
    _check_usable(path, df, first_win["median"], start, window)
    if len(idle_seen):  # said once the trace is known to be usable: a refused command says one thing
        notes.append(distill_notes.warn(path, idle.note(np.asarray(idle_seen))))
    in_window = df[(df["step"] >= start) & (df["step"] < start + window)]
    rule.flags, evidence, method = degenerate.flag_window(in_window, first_win["median"], rule.kinds, outlier,
                                                          precision=meta.get("precision"))
    spread, spread_notes = distill_notes.tied_spread(path, round, first_win["median"], rule.flags, rule.tied)
    marks_seen = None if allow_divergence else marks
    later = pd.Series(math.nan, index=groups)
    if whole:
        later_start = _later_start(drift, start, window, length, marks_seen)
        if later_start is not None:
            later = _grid_window(grid, later_start, later_start + window)["median"].reindex(groups)
    else:
        later_start, tail = _later_window(path, df, schedule, drift, start, window, length, filter,
                                          marks_seen, foreign)
        if later_start is not None:
            later = analysis.window_medians(tail, window, later_start).set_index("group").reindex(groups)["median"]

    multipliers: dict[str, float] = {}
    sched: dict[str, list[list]] = {}
    if schedule:
        windowed = (analysis.windows_frame(grid, window, start) if whole
                    else analysis.windowed_medians(df, window, start))
        del grid, df  # the schedule needs only the window medians from here
        sched = _schedules(windowed, groups, rule, first_win["median"])
        first_factor = pd.Series([sched[g][0][1] for g in groups], index=groups, dtype=np.float64)
    else:
        first_factor = rule.factors(first_win["median"])
        multipliers = dict(zip(groups, first_factor.reindex(groups).to_numpy(np.float64).tolist()))

    records = group_records(groups, table, rule, first_win, first_factor, later, evidence)
    source = {
        "trace": str(trace_path),  # as given: an absolute path would not survive moving the folder
        "window": int(window),
        "start": int(start),
        "steps": [int(extent[0]), int(extent[1])],
        "later_window_start": later_start,
        "mode": "schedule" if schedule else "static",
        "round": str(round),
        "filter": int(filter) if filter else None,
        "tie": tie,
        "outlier": outlier,
        "flagged": {g: f for g, f in zip(groups, rule.flags.reindex(groups).tolist()) if f},
        "degenerate": method,
        "tied_spread": None if math.isnan(spread) else float(spread),
        "warnings": notes + spread_notes,
        "fallback": FALLBACK,
        "direction_lr": _direction_lr(meta),
        "metadata": {k: v for k, v in meta.items() if k != "groups"},
        "groups": records,
    }
    if late:
        source["divergence"] = {**marks.to_dict(), "first": marks.first, "windows": [list(w) for w in late]}
    return Corrections(multipliers=multipliers, schedule=sched, source=source)


# --------------------------------------------------------------------------- the steps

PAPER_WINDOW = 2000  # the paper's window at batch 8K (Section 5, Table 5)


def default_window(length: int) -> int:
    """The window :func:`distill` takes when none is given: the paper's 2000 steps, capped to the
    first quarter of a trace of ``length`` steps (at least 1 step)."""
    return max(1, min(PAPER_WINDOW, length // 4))


def check_window(trace_path: PathLike, window: Optional[int], start: int) -> int:
    """The window (``None``: :func:`default_window`) distilling ``trace_path`` from ``start`` would
    use, checked against the trace's steps from its metadata and part names alone (no rows read).

    Raises :class:`~graftlab.errors.GraftlabError` for a path that is not a readable trace or a
    window that runs past its end."""
    return _fit(Path(trace_path), window, start)[3]


def _fit(path: Path, window: Optional[int], start: int) -> tuple[dict[str, Any], tuple[int, int], int, int]:
    meta = read_metadata(path)
    extent = trace_extent(path)
    length = _length(meta, extent)
    if window is None:  # a quarter of the steps the trace holds (a trace may start past step 0)
        window = default_window(length - min(extent[0], start))
    if start + window > length:
        if start >= length:
            what = f"{{start={start}}} is past the trace's end"
        elif window > length:
            what = f"{{window={window}}} is longer than the trace"
        else:
            what = f"{{window={window}}} from {{start={start}}} runs past the end of the trace"
        raise GraftlabError(f"{path}: {what} ({length} steps: {extent[0]}..{extent[1]}); choose {{start}} and "
                            f"{{window}} with {{start}} + {{window}} <= {length}", param=("start", "window"))
    return meta, extent, length, window


def check_settings(window: Any, start: Any, round: str, filter: Optional[int], outlier: Any = None,
                   tie: Optional[str] = None) -> None:
    """Bad settings fail before any reading (``window=None``: :func:`default_window`).

    Raises :class:`~graftlab.errors.GraftlabError` naming the setting."""
    analysis.parse_round(round)
    if tie is not None:
        analysis.tied_groups([], pd.DataFrame(), tie)  # compiles the regex
    if outlier is not None and (isinstance(outlier, bool) or not isinstance(outlier, (int, float, np.number))
                                or not math.isfinite(outlier) or outlier < 0):
        raise GraftlabError(f"{{outlier}} must be a finite number >= 0 (0 or None: off), got {outlier!r}",
                            param="outlier")
    if window is None:
        pass
    elif isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise GraftlabError(f"{{window}} must be a positive number of steps, got {window!r}", param="window")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise GraftlabError(f"{{start}} must be a step number >= 0, got {start!r}", param="start")
    medians.filter_width(filter, "filter")


def _names(groups: Any, limit: int = 5) -> str:
    groups = [str(g) for g in groups]
    return ", ".join(groups[:limit]) + (f", ... ({len(groups)} in all)" if len(groups) > limit else "")


def _check_usable(path: Path, df: pd.DataFrame, medians: pd.Series, start: int, window: int) -> None:
    """Ratios are quotients of norms: a negative one is a corrupt trace, and a window where no group
    has a finite positive median would give every group the fallback factor 1.0 -- no correction."""
    in_window = df[(df["step"] >= start) & (df["step"] < start + window)]
    negative = in_window.loc[in_window["ratio"].to_numpy() < 0, "group"].unique()
    if len(negative):
        raise GraftlabError(f"{path}: negative ratios (a ratio of norms cannot be negative; a corrupt trace?) "
                            f"in group(s) {_names(negative)}")
    med = medians.to_numpy(dtype=np.float64)
    if not (np.isfinite(med) & (med > 0)).any():
        raise GraftlabError(
            f"{path}: no group has a finite positive ratio in steps {start}..{start + window - 1} (all NaN, "
            f"infinite or zero: no step of D, or no step of M), nothing to distill: {_names(medians.index)}"
        )


def _length(meta: dict[str, Any], extent: tuple[int, int]) -> int:
    """Steps the trace covers: a trace recorded every k-th step covers k steps past its last row."""
    every = meta.get("every")
    return extent[1] + (every if isinstance(every, int) and every > 0 else 1)


def _read(path: Path, start: int, stop: Optional[int], filter: Optional[int],
          idle_seen: Optional[list] = None) -> pd.DataFrame:
    """The rows of steps ``start`` to ``stop`` (exclusive; None: the end), lr-0 steps left out and
    median-filtered by ``filter``. The filter sees the half width past ``stop`` too, as it does in
    the whole-trace grid: the window's last steps get the same neighbours as in a schedule."""
    reach = stop + filter // 2 if filter and stop is not None else stop
    df = read_trace(path, steps=(start, reach))
    df.attrs = {}  # pandas deep-copies attrs on every operation; the metadata is read separately
    df, steps = idle.without_idle(df)  # before the filter, which would spread their zeros
    if idle_seen is not None:
        idle_seen.extend(s for s in steps.tolist() if stop is None or s < stop)
    if not filter:
        return df
    df = analysis.filter_groups(df, filter)
    return df if reach == stop else df[df["step"].to_numpy() < stop].reset_index(drop=True)


def _prefix_marks(path: Path, start: int, foreign: bool) -> divergence.Marks:
    """Divergence marks of the steps before ``start`` (nothing to read from step 0)."""
    if start <= 0:
        return divergence.Marks()
    return divergence.find(read_trace(path, steps=(0, start)), foreign)


def _check_gaps(path: Path, windows: list[tuple[int, int]], foreign: bool) -> None:
    """GraftlabError when a window holds steps missing between the parts of a recorded trace (a part
    file gone, :mod:`graftlab.trace.gaps`): its medians would cover fewer steps than it says. Only
    the footers of the parts the windows span are read; a single file or a foreign table has no
    parts to lose."""
    if not windows or foreign or not path.is_dir():
        return
    missing = open_parts(path, (min(a for a, _ in windows), max(b for _, b in windows)))[3]
    gaps.check_windows(path, missing, windows)


def _ratio_grid(path: Path, start: int, filter: Optional[int]) -> tuple[medians.Grid, np.ndarray]:
    """The trace's ratios from ``start`` on as a (groups, steps) grid, median-filtered by ``filter``
    (a 100,000-step x 400-group trace is 320 MB there, against several GB as rows), without its
    idle steps (:mod:`graftlab.distill.idle`), and those steps."""
    grid, _ = medians.read_grid(path, steps=(start, None))
    values, steps = idle.grid_without_idle(grid.values, grid.steps)
    if len(steps):
        grid = dataclasses.replace(grid, values=values)
    return (grid.filtered(filter) if filter else grid), steps


def _grid_window(grid: medians.Grid, lo: int, hi: int) -> pd.DataFrame:
    """:func:`graftlab.distill.analysis.window_medians` of a grid, indexed by group."""
    med, fin, non = grid.window(lo, hi)
    return pd.DataFrame({"median": med, "n_finite": fin, "n_nonfinite": non},
                        index=pd.Index(grid.groups, name="group"))


def _later_start(drift: bool, start: int, window: int, end: int, marks: Optional[divergence.Marks]) -> Optional[int]:
    """First step of the drift window: the last ``window`` steps before ``end`` and before any
    divergence (``marks``; None: wherever it is), when at least two windows fit; else None."""
    if marks is not None and marks.first is not None:
        end = min(end, marks.first)
    return end - window if drift and end - start >= 2 * window else None


def _later_window(path: Path, df: pd.DataFrame, schedule: bool, drift: bool, start: int, window: int,
                  length: int, filter: Optional[int], marks: Optional[divergence.Marks], foreign: bool):
    """``(start, rows)`` of the drift window (:func:`_later_start`); ``(None, None)`` without one."""
    end = length
    while True:  # a divergence found in the tail moves the window before it (end only decreases)
        if marks is not None and marks.first is not None:
            end = min(end, marks.first)
        later_start = _later_start(drift, start, window, end, None)
        if later_start is None:
            return None, None
        tail = df if schedule else _read(path, later_start, None, filter)
        tail = tail[(tail["step"] >= later_start) & (tail["step"] < end)]
        found = divergence.find(tail, foreign) if marks is not None else divergence.Marks()
        if found.first is None:
            return later_start, tail
        marks = found


def _groups(present: list[str], table: pd.DataFrame) -> list[str]:
    """The groups read, in the metadata's order, then any the metadata does not list."""
    known, seen = set(table.index), set(present)
    return [g for g in table.index if g in seen] + [g for g in present if g not in known]


@dataclass
class _Rule:
    """How medians become factors: stand-ins for flagged groups, then the rounding."""

    round: str
    kinds: pd.Series
    tied: pd.Series
    flags: Optional[pd.Series] = None

    def stand_in(self, medians: pd.Series) -> pd.Series:
        return degenerate.fallback_factors(medians, self.kinds, self.flags)

    def factors(self, medians: pd.Series) -> pd.Series:
        """NaN where a window gives an unflagged group no usable median (a schedule carries over)."""
        usable = self.stand_in(medians)
        ok = np.isfinite(usable) & (usable > 0)
        out = pd.Series(math.nan, index=usable.index)
        out[ok] = analysis.apply_round(usable[ok], self.round, self.tied[ok])
        return out


def _schedules(windowed: pd.DataFrame, groups: list[str], rule: _Rule,
               first_medians: pd.Series) -> dict[str, list[list]]:
    """Per-group piecewise-constant schedules from consecutive windows' medians (``windowed``, long:
    :func:`graftlab.distill.analysis.windowed_medians`; Figure 4)."""
    rows = []
    # The first window's flags are its own (a group with no finite ratio there gets the stand-in, as
    # the static factor does); later windows keep only the degenerate verdict, which is about the
    # group, and a group's own median counts wherever it has one.
    later = dataclasses.replace(rule, flags=rule.flags.where(rule.flags == degenerate.FLAG_DEGENERATE, ""))
    for i, (s, part) in enumerate(windowed.groupby("start", sort=True)):
        # a window where a group has no finite ratio keeps the previous factor (piecewise)
        f = (rule if i == 0 else later).factors(part.set_index("group")["median"].reindex(groups))
        rows.append(pd.DataFrame({"start": s, "group": groups, "factor": f.to_numpy()}))
    sched = analysis.piecewise(pd.concat(rows, ignore_index=True), "factor")
    fallback = rule.factors(first_medians)
    for g in groups:  # groups with no finite ratio anywhere: their fallback factor throughout
        if g not in sched:
            sched[g] = [[0, float(fallback[g])]]
    return sched


def _direction_lr(meta: dict[str, Any]) -> Optional[float]:
    hp = ((meta.get("direction") or {}).get("hyperparameters") or {})
    lr = hp.get("lr")
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def default_output(trace_path: PathLike, format: str = "json") -> Path:
    """Where ``graftlab distill`` writes by default: ``<trace>.corrections.<format>`` beside it."""
    p = Path(os.path.normpath(str(trace_path)))
    if p.name in ("", ".", ".."):  # the current folder (or its parent): named by its real name
        p = Path(os.path.abspath(p))
    return p.with_name(p.name + f".corrections.{format}")
