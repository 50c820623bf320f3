"""The checks on what a read keeps: ``steps=(start, stop)`` and ``groups=[names]``.

A range whose own bounds keep nothing (``(50, 10)``, ``(10, 10)``) and a group name the trace does
not hold are a caller's mistake, said in one :class:`~graftlab.errors.GraftlabError` naming the
argument, rather than an empty frame that looks like an empty trace. A range past the recorded
steps is a well-formed question and reads as empty.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Optional, Sequence

from graftlab.errors import GraftlabError

Steps = Optional[tuple[Optional[int], Optional[int]]]
_SHOWN = 5  # names quoted in an error; the rest are counted
_INT64_MAX = 2 ** 63 - 1


def check_steps(steps: object) -> Steps:
    """``steps`` as ``(start, stop)`` (``start <= step < stop``, either end None), or None.

    Raises GraftlabError (``param="steps"``) for anything but a pair of whole numbers or None, and
    for ``start >= stop``: a range that holds no step whatever the trace holds. Ends beyond int64
    (the steps' type) are clamped: ``(0, 10**30)`` reads every step from 0."""
    if steps is None:
        return None
    said = "{steps} must be (start, stop) with whole-number ends (either may be None) and start < stop"
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or len(steps) != 2:
        raise GraftlabError(f"{said}, got {steps!r}", param="steps")
    ends = []
    for end in steps:
        if end is not None and (isinstance(end, bool) or not isinstance(end, numbers.Integral)):
            raise GraftlabError(f"{said}, got {tuple(steps)!r}", param="steps")
        ends.append(None if end is None else int(end))
    start, stop = ends
    # steps are int64 in every trace: a bound past that range bounds nothing on its side
    if stop is not None and stop > _INT64_MAX:
        stop = None
    if start is not None and start < -_INT64_MAX:
        start = None
    if start is not None and start > _INT64_MAX:
        start = _INT64_MAX  # past every step: the read is empty, as for any range past the end
    if stop is not None and stop < -_INT64_MAX:
        stop = -_INT64_MAX
    if start is not None and stop is not None and start >= stop:
        what = "empty" if start == stop else "reversed"
        raise GraftlabError(f"{said}, got {(start, stop)!r}: the range is {what}", param="steps")
    return start, stop


def check_group_names(groups: object) -> Optional[list[str]]:
    """``groups`` as a list of names, or None; one string is refused (it would be read letter by letter)."""
    if groups is None:
        return None
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise GraftlabError(f"{{groups}} must be a list of group names, got {groups!r} "
                            f"(pass [{groups!r}] for one group)", param="groups")
    return [str(g) for g in groups]


def few(names: Sequence[str]) -> str:
    """The first few of ``names`` quoted, and how many there are in all when they are more."""
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown if len(names) <= _SHOWN else f"{shown}, ... ({len(names)} in all)"


def check_known(groups: Optional[Sequence[str]], known: Iterable[str], where: object) -> None:
    """GraftlabError (``param="groups"``) when ``groups`` names a group that is not in ``known``
    (the trace's groups), quoting a few of the unknown names and a few of the known ones."""
    if groups is None:
        return
    known = list(known)
    have = set(known)
    unknown = [g for g in dict.fromkeys(groups) if g not in have]
    if unknown:
        raise GraftlabError(f"{{groups}} names {len(unknown)} unknown group(s): {few(unknown)}; "
                            f"{where} holds {few(known) or 'no groups'}", param="groups")
