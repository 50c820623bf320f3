"""What :func:`graftlab.distill.pipeline.distill` warns about: settings that run but likely do not do what
was meant. Each note is a ``UserWarning`` (prefixed with the trace's path) and a line in the
corrections' ``source["warnings"]``, which ``graftlab distill`` prints one per line.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional

import pandas as pd

from graftlab.distill import analysis

# the caller of distill(): warn() <- this module's function <- distill() <- the caller
_STACKLEVEL = 4


def warn(path: Path, note: str) -> str:
    warnings.warn(f"{path}: {note}", stacklevel=_STACKLEVEL)
    return note


def settings(path: Path, round: str, tie: Optional[str], tied: pd.Series, filter: Optional[int],
             window: int) -> list[str]:
    """Notes on the settings themselves, given the trace's groups.

    - a ``tie`` regex that matches no group name under ``D<beta>`` rounding ties nothing, so every
      group keeps its own median rounded to a power of ten: a typo would pass unseen;
    - a ``tie`` regex under any other rounding is not used at all (only ``D<beta>`` and
      ``DA<beta>`` tie groups to beta): the user meant a rounding they did not ask for;
    - a median filter wider than the window: the paper filters with width 51 series of thousands of
      steps (Figures 4-8, Section 5); wider than a window, each filtered value is mostly a median
      over neighbouring windows (in a schedule) or over the whole window (static), so windows blur.
    """
    notes = []
    dbeta = analysis.parse_round(round)[0] in ("dbeta", "dbeta_attn")
    if tie is not None and not dbeta:
        notes.append(warn(path, f"the tie regex {tie!r} only applies with D<beta> or DA<beta> rounding; "
                                f"rounding {round!r} ties no group"))
    if tie is not None and dbeta and not tied.any():
        notes.append(warn(path, f"the tie regex {tie!r} matches none of the {len(tied)} group names: {round} "
                                "ties no group to beta (each keeps its own median, rounded)"))
    if filter and filter > window:
        notes.append(warn(path, f"the median filter (width {filter}) is wider than the window ({window} steps): "
                                "each filtered ratio is then mostly a median over neighbouring windows; the "
                                "paper filters with width 51 over thousands of steps"))
    return notes


def tied_spread(path: Path, round: str, medians: pd.Series, flags: pd.Series,
                tied: pd.Series) -> tuple[float, list[str]]:
    """How far apart the medians that D_beta ties to one beta are (max/min of the unflagged ones),
    and a warning when more than ``analysis.SPREAD_WARN``: one beta then over- or undershoots."""
    if analysis.parse_round(round)[0] not in ("dbeta", "dbeta_attn"):
        return math.nan, []
    spread = analysis.tied_spread(medians[flags == ""], tied)
    if not spread > analysis.SPREAD_WARN:
        return spread, []
    note = (f"{round}: the tied groups' medians span {spread:.3g}x (more than {analysis.SPREAD_WARN:g}x); "
            "one beta over- or undershoots some of them")
    return spread, [warn(path, note)]
