"""Per-group medians over tens of millions of trace rows: the engine under :mod:`graftlab.distill.analysis`
and :mod:`graftlab.distill.pipeline`.

A recorded trace is a dense grid, (recorded steps) x (groups), in step then group order. The engine
holds its ratios as a :class:`Grid`: one contiguous float64 row per group (``(G, S)``), NaN where a
ratio is not finite or was not recorded. On that layout

- the paper's median filter (width 51, centred, NaN-skipping, shrinking at the ends) is
  ``bottleneck.move_median`` over each row, a double-heap running median in C;
- a window's per-group medians are ``bottleneck.nanmedian`` over a ``(G, steps in window)`` block,
  a selection (not a sort) per group.

Both are exact: the same float64 values as ``numpy.median`` of the finite values (tested against
that reference). Measured alternatives on the 100,000-step x 400-group trace (bench/median_engines.py,
bench/RESULTS.md): pandas (group-by and rolling), Polars (``group_by().median()``,
``rolling_median().over()``), DuckDB (``median()`` and a windowed ``median() OVER``) and Arrow
compute (whose only hash median is the approximate t-digest) were slower or not exact.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Optional

import bottleneck as bn
import numpy as np

from graftlab.errors import GraftlabError

# groups per block of the running median: bounds the padded copy it makes, and feeds the threads
_BLOCK = 16


MAX_WIDTH = 100_001  # widest median filter: 50,000 steps each side (the paper's is 51)


def check_width(width: Any, name: str = "median filter width") -> int:
    """``width`` as an int; ``name``: the parameter that set it, for the message.

    Raises:
        GraftlabError: ``width`` is not a positive odd integer."""
    said, param = (f"{{{name}}}", name) if name.isidentifier() else (name, None)
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1 or width % 2 == 0:
        raise GraftlabError(f"{said} must be a positive odd integer (a median filter's width), got {width!r}",
                            param=param)
    if width > MAX_WIDTH:  # each step's window is held in memory: a wider one is a typo, not a filter
        raise GraftlabError(f"{said} must be at most {MAX_WIDTH} (a median filter's width), got {width!r}",
                            param=param)
    return int(width)


def filter_width(width: Any, name: str) -> Optional[int]:
    """A median filter's width as every command and function that filters takes it (``distill
    --filter``, ``plot --width``, the figures' ``width``): an odd whole number up to
    :data:`MAX_WIDTH`, with None, 0 and 1 meaning no filter (a width-1 median is the value itself).
    Returns None for no filter, else the width.

    Raises:
        GraftlabError (``param=name``): a bool, a float, a negative or even number, or one past
            :data:`MAX_WIDTH`."""
    if width is None or (not isinstance(width, bool) and isinstance(width, (int, np.integer)) and width in (0, 1)):
        return None
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1 or width % 2 == 0:
        raise GraftlabError(f"{{{name}}} must be an odd median-filter width (0 or 1 turns it off), got {width!r}",
                            param=name)
    return check_width(width, name)


def running_median(values: np.ndarray, width: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Centred running median of odd ``width`` along the last axis, skipping NaN, shrinking at the ends.

    ``out[..., i]`` is the median of the non-NaN values among ``values[..., max(0, i - h) : i + h + 1]``
    (``h = width // 2``), NaN where there is none. ``values`` is float64 (1-D or 2-D).
    """
    width = check_width(width)
    x = np.asarray(values, dtype=np.float64)
    if out is None:
        out = np.empty_like(x)
    h = width // 2
    if h == 0 or x.shape[-1] == 0:
        out[...] = x
        return out
    if x.ndim == 1:
        out[:] = _running_block(x[None, :], width)[0]
        return out
    blocks = [slice(i, min(i + _BLOCK, x.shape[0])) for i in range(0, x.shape[0], _BLOCK)]

    def run(b: slice) -> None:
        out[b] = _running_block(x[b], width)

    workers = min(len(blocks), os.cpu_count() or 1, 4)
    if workers > 1:  # bottleneck works without the GIL for most of a block
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, blocks))
    else:
        for b in blocks:
            run(b)
    return out


def _running_block(x: np.ndarray, width: int) -> np.ndarray:
    # move_median is a trailing window: pad h NaN at the end and shift by h to centre it;
    # min_count=1 makes the first windows (and the NaN-padded last ones) shrink.
    h, n = width // 2, x.shape[1]
    pad = max(h, width - n)  # move_median needs at least ``width`` values
    padded = np.concatenate([x, np.full((x.shape[0], pad), np.nan)], axis=1)
    return bn.move_median(padded, width, min_count=1, axis=1)[:, h:h + n]


@dataclass
class Grid:
    """A trace's ratios as ``(groups, steps)``.

    ``values[g, j]``: the ratio of group ``groups[g]`` at step ``steps[j]`` as float64, NaN where it
    was not finite or not recorded; ``recorded``: ``(G, S)`` bool of the recorded cells, None when
    every cell is (a dense grid: every recorded trace).
    """

    groups: list[str]
    steps: np.ndarray
    values: np.ndarray
    recorded: Optional[np.ndarray] = None

    def filtered(self, width: int) -> "Grid":
        """Each group's series median-filtered (:func:`running_median`), in place of the ratios.

        Steps whose ratio was not finite stay NaN (so window counts still describe the recording).
        Where some cells are missing, each group's recorded cells are filtered as one series.
        """
        width = check_width(width)
        nan = np.isnan(self.values)
        if self.recorded is None:
            out = running_median(self.values, width)
        else:
            out = np.full_like(self.values, np.nan)
            for g in range(len(self.groups)):
                cells = self.recorded[g]
                out[g, cells] = running_median(self.values[g, cells], width)
        out[nan] = np.nan
        return replace(self, values=out)

    def window(self, lo: Optional[int], hi: Optional[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per group over steps ``lo <= step < hi``: ``(median, n_finite, n_nonfinite)``, each ``(G,)``.

        The median is of the finite ratios (NaN where there is none); ``n_nonfinite`` counts the
        recorded steps whose ratio was not finite.
        """
        a = 0 if lo is None else int(np.searchsorted(self.steps, lo, side="left"))
        b = len(self.steps) if hi is None else int(np.searchsorted(self.steps, hi, side="left"))
        g = len(self.groups)
        if b <= a:
            return np.full(g, np.nan), np.zeros(g, np.int64), np.zeros(g, np.int64)
        block = self.values[:, a:b]
        finite = np.count_nonzero(~np.isnan(block), axis=1)
        rows = (b - a) if self.recorded is None else np.count_nonzero(self.recorded[:, a:b], axis=1)
        med = bn.nanmedian(block, axis=1)
        return np.asarray(med, dtype=np.float64), finite.astype(np.int64), (rows - finite).astype(np.int64)

    def windows(self, window: int, start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Consecutive windows ``[start + k*window, start + (k+1)*window)`` up to the last step.

        Returns ``(starts (W,), median (W, G), n_finite (W, G), n_nonfinite (W, G))``; a window
        without recorded steps has NaN medians and zero counts.
        """
        steps = self.steps[self.steps >= start]
        n_win = int((steps[-1] - start) // window) + 1 if steps.size else 0
        starts = start + np.arange(n_win, dtype=np.int64) * window
        g = len(self.groups)
        med = np.full((n_win, g), np.nan)
        fin = np.zeros((n_win, g), np.int64)
        non = np.zeros((n_win, g), np.int64)
        for k, s in enumerate(starts):
            med[k], fin[k], non[k] = self.window(int(s), int(s) + window)
        return starts, med, fin, non


def grid(step: np.ndarray, code: np.ndarray, ratio: np.ndarray, names: list[str]) -> Grid:
    """A :class:`Grid` from long columns: ``step`` (N,) ints, ``code`` (N,) positions in ``names``,
    ``ratio`` (N,) floats. Groups without rows are left out. Raises GraftlabError where a
    (step, group) pair appears twice."""
    step = np.asarray(step, dtype=np.int64)
    code = np.asarray(code)
    n, g = len(step), len(names)
    if g and n and n % g == 0:
        s2, c2 = step.reshape(-1, g), code.reshape(-1, g)
        # a dense grid in step then group order: every recorded trace, checked in two passes
        if (c2 == np.arange(g)).all() and (s2 == s2[:, :1]).all() and (np.diff(s2[:, 0]) > 0).all():
            return _dense_grid(names, s2[:, 0].copy(), np.asarray(ratio))
    code = code.astype(np.int64)
    present = np.flatnonzero(np.bincount(code, minlength=g)) if n else np.array([], np.int64)
    remap = np.full(max(g, 1), -1, np.int64)
    remap[present] = np.arange(len(present))
    rows = remap[code]
    steps = np.unique(step)
    cols = np.searchsorted(steps, step)
    values = np.full((len(present), len(steps)), np.nan)
    recorded = np.zeros((len(present), len(steps)), bool)
    recorded[rows, cols] = True
    if int(recorded.sum()) != n:
        raise GraftlabError(_duplicate(step, code, names))
    r = np.asarray(ratio, dtype=np.float64)
    values[rows, cols] = np.where(np.isfinite(r), r, np.nan)
    return Grid([names[i] for i in present], steps, values, None if recorded.all() else recorded)


def _duplicate(step: np.ndarray, code: np.ndarray, names: list[str]) -> str:
    """The message for rows holding a (step, group) pair twice: the first such pair in row order."""
    key = step * max(len(names), 1) + code
    _, first = np.unique(key, return_index=True)
    seen = np.zeros(len(key), bool)
    seen[first] = True
    i = int(np.flatnonzero(~seen)[0])  # the earliest row that repeats an earlier one
    return f"step {int(step[i])} of group {names[int(code[i])]!r} appears more than once in the trace"


def _dense(batches: Any, n_groups: Any) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(steps (S,), ratios (S*G,) float32, or float64 where a batch is)`` when the streamed rows form a dense grid in step then
    group order (rows ``j*G .. j*G+G-1`` are step ``steps[j]``, groups 0..G-1), else None.

    Checked batch by batch (a batch may begin or end inside a step), so no long column is ever held
    whole; ``n_groups()`` is read once the first batch has named the groups.
    """
    steps_out: list[np.ndarray] = []
    ratios: list[np.ndarray] = []
    o, g, last = 0, None, None  # rows so far, groups, (block, step) of the last row
    for s, c, r in batches:
        g = n_groups() if g is None else g
        m = len(s)
        rows = np.arange(o, o + m)
        if g == 0 or not np.array_equal(c, rows % g):
            return None
        block = rows // g
        starts = np.flatnonzero(np.concatenate([[True], block[1:] != block[:-1]]))
        firsts = s[starts]
        if not np.array_equal(s, np.repeat(firsts, np.diff(np.concatenate([starts, [m]])))):
            return None  # a step's rows hold different step numbers
        if last is not None and block[0] == last[0] and firsts[0] != last[1]:
            return None
        heads = rows[starts] % g == 0
        steps_out.append(firsts[heads])
        # float32 as recorded; a table another tool wrote may hold float64, which is kept
        ratios.append(np.asarray(r, np.float64 if np.asarray(r).dtype == np.float64 else np.float32))
        last = (block[-1], s[-1])
        o += m
    if g is None or o % g:
        return None
    steps = np.concatenate(steps_out) if steps_out else np.array([], np.int64)
    if len(steps) > 1 and not (np.diff(steps) > 0).all():
        return None
    return steps.astype(np.int64), np.concatenate(ratios) if ratios else np.array([], np.float32)


def _dense_grid(names: list[str], steps: np.ndarray, ratio: np.ndarray) -> Grid:
    values = ratio.reshape(len(steps), len(names)).T.astype(np.float64, order="C")
    values[~np.isfinite(values)] = np.nan
    return Grid(list(names), steps, values)


def read_grid(path: Any, steps: Optional[tuple[Optional[int], Optional[int]]] = None) -> tuple[Grid, dict[str, Any]]:
    """The ratios of a trace (or of ``steps=(start, stop)``) as a :class:`Grid`, and its metadata.

    Reads only ``step``, ``group`` and the ratio (a ``/2`` trace's norms), and only the parts that
    can hold ``steps``, streamed batch by batch into the grid (a dense trace is never held as long
    columns); a trace that is not a dense grid is read whole instead. Raises what
    :func:`graftlab.trace.read_trace` raises.
    """
    from graftlab.trace import read_table
    from graftlab.trace.scanning import scan_ratios

    batches, codes, meta = scan_ratios(path, steps=steps)
    dense = _dense(batches, lambda: len(codes.names))
    if dense is not None:
        if len(dense[0]) == 0:
            return Grid([], np.array([], np.int64), np.empty((0, 0))), meta
        return _dense_grid(codes.names, *dense), meta
    if meta.get("foreign"):  # rows in any order: collected as compact columns, then placed
        batches, codes, meta = scan_ratios(path, steps=steps)
        cols = [(s, c, np.asarray(r, np.float32 if r.dtype == np.float32 else np.float64)) for s, c, r in batches]
        if not cols:
            return Grid([], np.array([], np.int64), np.empty((0, 0))), meta
        step, code, ratio = (np.concatenate([c[i] for c in cols]) for i in range(3))
        del cols
        try:
            return grid(step, code, ratio, codes.names), meta
        except GraftlabError as err:
            raise GraftlabError(f"{path}: {err}") from None
    table, meta = read_table(path, steps=steps, columns=[], required=("step", "group", "ratio"))
    group = table.column("group")
    if group.num_chunks == 0 or table.num_rows == 0:
        return Grid([], np.array([], np.int64), np.empty((0, 0))), meta
    names = group.chunk(0).dictionary.to_pylist()  # read_table gives every chunk this dictionary
    code = np.concatenate([c.indices.to_numpy() for c in group.chunks])
    try:
        return grid(table.column("step").to_numpy(), code, table.column("ratio").to_numpy(), names), meta
    except GraftlabError as err:  # the grid does not know which file it was read from
        raise GraftlabError(f"{path}: {err}") from None
