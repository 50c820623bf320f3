"""Corrections for slices of a tensor: fused Q/K/V thirds, attention heads, vocabulary row blocks.

A group named ``<tensor>[<slice>]`` (``[q]``, ``[head 3]``, ``[q head 3]``, ``[rows 0-99]``,
``[row 5]``; :mod:`graftlab.graft.slicing`) is part of one parameter tensor, and one tensor has one
learning rate in torch.optim. Its factor therefore goes into an ``lr_scale`` tensor broadcastable
to the parameter (one value per slice along the slice's dimension) that step hooks multiply the
optimizer's step by (:func:`graftlab.corrections.applying.register_scales`). That is the same as
scaling the slice's learning rate for every torch.optim optimizer (their steps are proportional to
lr). A per-slice schedule makes ``lr_scale`` change with the step: :class:`SliceSchedule` refills
the slices whose factor changes, only at the steps where one does.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from graftlab.graft.schedules import Piecewise

Slice = tuple[int, int, int, int]  # (parameter position, dim, start, stop)


def head_counts(groups: Sequence[str]) -> dict[tuple[str, Optional[str]], int]:
    """``(tensor, q/k/v label) -> number of heads``: one more than the largest head index the file
    holds for that tensor (a file of a head-granularity trace holds every head)."""
    from graftlab.graft.slicing import parse_group

    out: dict[tuple[str, Optional[str]], int] = {}
    for g in groups:
        parsed = parse_group(g)
        if parsed is not None and parsed[2] is not None:
            key = (parsed[0], parsed[1])
            out[key] = max(out.get(key, 0), parsed[2] + 1)
    return out


def slice_of(group: str, names: list[str], params: list[Any], heads: dict) -> Optional[Slice]:
    """``(parameter position, dim, start, stop)`` when ``group`` names a slice of a parameter in
    ``names`` that its shape has (the partition's own layout, :mod:`graftlab.graft.slicing`), else
    None. ``heads``: :func:`head_counts` of the file's groups."""
    from graftlab.graft.slicing import fused_layout
    from graftlab.graft.slicing import Slicing, parse_group, units_of
    from graftlab.kinds import classify

    parsed = parse_group(group)
    if parsed is None or parsed[0] not in names:
        return None
    name, qkv, head, rows = parsed
    i = names.index(name)
    shape = tuple(params[i].shape)
    if rows is not None:
        if head is not None or qkv is not None or not shape or rows[1] > shape[0]:
            return None
        return i, 0, rows[0], rows[1]
    if head is None:  # a Q/K/V third
        layout = fused_layout(name, shape)
        if layout is None or qkv not in layout[1]:
            return None
        dim, labels = layout
        size = shape[dim] // len(labels)
        j = labels.index(qkv)
        return i, dim, j * size, (j + 1) * size
    n = heads.get((name, qkv))
    if not n:
        return None
    try:
        units = units_of(name, shape, classify(name).kind, "head", Slicing(heads={name: n}), None)
    except Exception:  # a head count that does not divide this model's tensor: not this model's group
        return None
    label = group[len(name) + 1 : -1]
    for lab, (dim, start, stop) in units or ():
        if lab == label:
            return i, dim, start, stop
    return None


class SliceSchedule:
    """Step-dependent ``lr_scale`` of one tensor: ``scale[slice] = multiplier * schedule(step)``.

    ``pieces``: ``(dim, start, stop, multiplier, Piecewise)`` per scheduled slice. :meth:`at`
    writes the factors of ``step`` into ``scale`` where they change, and returns quickly on the
    other steps (one dict lookup), so a run pays per breakpoint, not per step and slice.
    """

    def __init__(self, scale: Any, pieces: list[tuple[int, int, int, float, Piecewise]]) -> None:
        self.scale = scale
        self.pieces = pieces
        self.starts = {int(s) for *_, sched in pieces for s in sched.starts} | {0}
        self._current: Optional[int] = None

    def at(self, step: int) -> None:
        """Make ``scale`` hold the factors for optimizer step ``step`` (counted from 0)."""
        if self._current is not None and step == self._current + 1 and step not in self.starts:
            self._current = step
            return
        self._current = step
        for dim, start, stop, mult, sched in self.pieces:
            self.scale.narrow(dim, start, stop - start).fill_(mult * float(sched(step)))
