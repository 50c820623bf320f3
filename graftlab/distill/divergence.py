"""Divergence marks: what shows, in a trace or a metrics file, that a run diverged.

A run diverges when a step's loss, gradients or step norms stop being finite. Its records carry two
marks, both plain columns that any Parquet reader sees:

- trace rows whose ``norm_m`` or ``norm_d`` is not finite. Ratios alone mark nothing: a zero D step
  gives an infinite ratio (and 0/0 a NaN one) while both norms stay finite;
- the :data:`RESTART_COLUMN` (``restart``), written by runs with ``on_divergence="restart"`` to the
  trace and the metrics file: how many times the run had restarted from its last good state with a
  smaller learning rate (LHOPT's restart action, Almeida et al. 2021, Section 3) when the row's step
  ran; 0 before the first restart. A restart rewinds the record to the state it restarts from, so
  each step appears once: the rows of the attempt that diverged are replaced.

:func:`find` locates the first marked step of a table; :func:`check_windows` is how
:func:`graftlab.distill.pipeline.distill` refuses windows that follow a divergence, naming them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from graftlab.errors import GraftlabError

ON_DIVERGENCE = ("stop", "restart")  # what a run does when a step is not finite
RESTART_COLUMN = "restart"
SHOWN = 3  # group names a one-line message lists before "+N more"


@dataclass(frozen=True)
class Marks:
    """The divergence marks found in (part of) a trace; every field None/empty/0 when there are none."""

    nonfinite_step: Optional[int] = None  # first step with a non-finite norm_m or norm_d
    groups: tuple[str, ...] = ()  # the groups whose norms were not finite at that step
    restart_step: Optional[int] = None  # first step that ran after a restart
    restarts: int = 0  # largest restart count seen

    @property
    def first(self) -> Optional[int]:
        """The first marked step (None: no divergence seen)."""
        found = [s for s in (self.nonfinite_step, self.restart_step) if s is not None]
        return min(found) if found else None

    def reason(self) -> str:
        """What was found, in one clause: ``norms not finite from step 7 in 3 groups (a, b, c)``."""
        parts = []
        if self.nonfinite_step is not None:
            parts.append(f"step norms not finite from step {self.nonfinite_step} in {name_list(self.groups)}")
        if self.restart_step is not None:
            times = "once" if self.restarts == 1 else f"{self.restarts} times"
            parts.append(f"restart marks from step {self.restart_step}: the run restarted {times} after diverging")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "groups": list(self.groups)}


def name_list(names: Sequence[str], total: Optional[int] = None, shown: int = SHOWN) -> str:
    """``3 groups (a, b, c)`` or ``40 of 59 groups (a, b, c, +37 more)``: a bounded list for one line."""
    names = list(names)
    head = ", ".join(names[:shown]) + (f", +{len(names) - shown} more" if len(names) > shown else "")
    of = f" of {total}" if total is not None else ""
    return f"{len(names)}{of} group{'s' if (total or len(names)) != 1 else ''} ({head})"


def find(df: pd.DataFrame, foreign: bool = False) -> Marks:
    """The divergence marks of a long trace table (columns ``step``, ``group``, ``norm_m``,
    ``norm_d``; ``restart`` when present). ``foreign``: a table another tool wrote, where a norm
    column that is NaN throughout was not in the table (unknown), so it marks nothing."""
    if df.empty:
        return Marks()
    steps = df["step"].to_numpy()
    norms = [c for c in ("norm_m", "norm_d") if c in df.columns and not (foreign and df[c].isna().all())]
    bad = np.zeros(len(df), dtype=bool)
    for c in norms:
        bad |= ~np.isfinite(df[c].to_numpy(dtype=np.float64))
    nonfinite, groups = None, ()
    if bad.any():
        nonfinite = int(steps[bad].min())
        at = bad & (steps == nonfinite)
        groups = tuple(str(g) for g in pd.unique(df["group"].to_numpy()[at]))
    restart_step, restarts = None, 0
    if RESTART_COLUMN in df.columns:
        counts = pd.to_numeric(df[RESTART_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
        marked = np.nan_to_num(counts, nan=0.0) > 0
        if marked.any():
            restart_step = int(steps[marked].min())
            restarts = int(np.nanmax(counts[marked]))
    return Marks(nonfinite, groups, restart_step, restarts)


def scan(path: Any, steps: Optional[tuple[Optional[int], Optional[int]]] = None) -> Marks:
    """:func:`find` over the trace at ``path`` (``steps=(start, stop)``: of those steps only), one
    record batch at a time: a 40M-row trace is never held as a table. A norm column that a
    foreign table lacks (unknown) marks nothing, as in :func:`find`."""
    import pyarrow.compute as pc

    from graftlab.trace.scanning import scan_batches

    batches, meta = scan_batches(path, ("step", "group", "norm_m", "norm_d"), (RESTART_COLUMN,), steps=steps)
    nonfinite, groups, restart_step, restarts = None, set(), None, 0
    for batch in batches:
        norms = [c for c in ("norm_m", "norm_d") if c in batch.schema.names]  # a foreign table may lack them
        if not norms:
            bad = None
        elif len(norms) == 1:
            bad = pc.invert(pc.is_finite(batch.column(norms[0])))
        else:
            bad = pc.or_(pc.invert(pc.is_finite(batch.column("norm_m"))), pc.invert(pc.is_finite(batch.column("norm_d"))))
        if bad is not None and pc.any(bad).as_py():
            rows = batch.filter(bad)
            first = pc.min(rows.column("step")).as_py()
            at = rows.filter(pc.equal(rows.column("step"), first)).column("group")
            names = {str(g) for g in at.to_pylist()}
            if nonfinite is None or first < nonfinite:
                nonfinite, groups = first, names
            elif first == nonfinite:
                groups |= names
        if RESTART_COLUMN in batch.schema.names:
            counts = pc.fill_null(pc.cast(batch.column(RESTART_COLUMN), "float64"), 0.0)
            marked = pc.greater(pc.if_else(pc.is_nan(counts), 0.0, counts), 0.0)
            if pc.any(marked).as_py():
                first = pc.min(batch.column("step").filter(marked)).as_py()
                restart_step = first if restart_step is None else min(restart_step, first)
                restarts = max(restarts, int(pc.max(counts.filter(marked)).as_py()))
    # in the trace's group order, as find() gives them
    order = {g["name"]: i for i, g in enumerate(meta.get("groups") or [])}
    named = tuple(sorted(groups, key=lambda n: (order.get(n, len(order)), n)))
    return Marks(nonfinite, named, restart_step, restarts)


def merge(*found: Marks) -> Marks:
    """The earliest marks of several parts of one trace."""
    nonfinite = [m for m in found if m.nonfinite_step is not None]
    first_bad = min(nonfinite, key=lambda m: m.nonfinite_step) if nonfinite else Marks()
    restarted = [m.restart_step for m in found if m.restart_step is not None]
    return Marks(first_bad.nonfinite_step, first_bad.groups, min(restarted) if restarted else None,
                 max((m.restarts for m in found), default=0))


def check_windows(where: Any, marks: Marks, windows: Sequence[tuple[int, int]], allow: bool) -> list[tuple[int, int]]:
    """The windows ``[start, stop)`` holding steps at or after ``marks.first``; a
    :class:`GraftlabError` naming them unless ``allow`` (then they are returned for the record).

    Distilling such a window would turn the ratios of a diverging run (or of one whose learning
    rate a restart changed) into corrections.
    """
    first = marks.first
    if first is None:
        return []
    late = [(a, b) for a, b in windows if b > first]
    if late and not allow:
        if len(late) == 1:
            what = f"the window of steps {late[0][0]}..{late[0][1] - 1} holds"
        else:
            starts = ", ".join(str(a) for a, _ in late[:SHOWN]) + (", ..." if len(late) > SHOWN else "")
            what = f"{len(late)} windows (starting at steps {starts}) hold"
        raise GraftlabError(
            f"{where}: {what} steps from a divergence on ({marks.reason()}); their ratios would become "
            "corrections: pass {allow_divergence=True} to distill them anyway", param="allow_divergence")
    return late

