"""Steps missing between the parts of a recorded trace (a part file deleted or lost in a copy).

A recorder writes the steps ``start, start + every, ...`` (multiples of ``every``, the metadata's
``every``) into parts named by their first step, so two neighbouring parts whose steps are more
than ``every`` apart lack the steps between them: reading the trace would silently average over
fewer steps than asked. Found from the footers' step statistics and the file names only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from graftlab.errors import GraftlabError
from graftlab.trace.layout import part_first_step

Gap = tuple[int, int]  # the first and last missing recorded step, inclusive


def recorded_every(meta: dict[str, Any]) -> Optional[int]:
    """The metadata's ``every`` (steps between recorded steps); None where it does not say."""
    every = meta.get("every") if isinstance(meta, dict) else None
    return every if isinstance(every, int) and not isinstance(every, bool) and every >= 1 else None


def find(meta: dict[str, Any], bounds: Iterable[Optional[tuple[int, int]]], next_first: Optional[int] = None,
         steps: Optional[tuple[Optional[int], Optional[int]]] = None) -> list[Gap]:
    """The runs of recorded steps missing between parts whose ``(min, max)`` step ``bounds`` are
    given in part order (None: an empty part); ``next_first`` is the named first step of the part
    after the last of them (the parts of a window are read, not the whole trace). Only gaps that
    meet ``steps=(start, stop)`` (``start <= step < stop``, either end None) are returned."""
    every = recorded_every(meta)
    if every is None:
        return []
    edges = [b for b in bounds if b is not None]
    if next_first is not None:
        edges.append((next_first, next_first))
    start, stop = steps if steps is not None else (None, None)
    out = []
    for (_, hi), (lo, _) in zip(edges, edges[1:]):
        if lo - hi > every:
            gap = (hi + every, max(hi + every, lo - every))
            if (stop is None or gap[0] < stop) and (start is None or gap[1] >= start):
                out.append(gap)
    return out


def next_part(files: Sequence[Path], kept: Sequence[Path]) -> Optional[int]:
    """The named first step of the file after the last one ``kept`` (None: it is the last)."""
    if not kept:
        return None
    i = files.index(kept[-1]) + 1
    return part_first_step(files[i]) if i < len(files) else None


def describe(gaps: Sequence[Gap]) -> str:
    """``"steps 30..39"``, or ``"steps 30..39 and 70..79"``."""
    spans = [f"{a}..{b}" if a != b else str(a) for a, b in gaps]
    return "steps " + (", ".join(spans[:-1]) + " and " + spans[-1] if len(spans) > 1 else spans[0])


def check_windows(where: Any, gaps: Sequence[Gap], windows: Sequence[tuple[int, int]]) -> None:
    """GraftlabError when a window ``[start, stop)`` holds steps the trace lacks: its medians would
    be taken over fewer steps than the window says."""
    for a, b in windows:
        inside = [(max(lo, a), min(hi, b - 1)) for lo, hi in gaps if lo < b and hi >= a]
        if inside:
            raise GraftlabError(
                f"{where}: the window of steps {a}..{b - 1} lacks {describe(inside)}, which the trace does not "
                "hold (a part file is gone?); restore the part, or pick a window without them")
