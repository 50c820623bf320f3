"""``source["groups"]`` of a corrections file: one :class:`GroupSource` record per group, how its
factor was found. Files of 10^5 to 10^6 groups are checked a field at a time over all records
(:func:`group_sources`); a record becomes a typed :class:`GroupSource` only when looked up."""
from __future__ import annotations

import itertools
import math
from operator import itemgetter
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from graftlab.errors import GraftlabError
from graftlab.io.jsonable import jsonable


@dataclass
class GroupSource:
    """How one group's factor was found: ``source["groups"][name]`` of a corrections file.

    :func:`graftlab.distill.pipeline.distill` writes every field but ``stand_in`` (flagged groups only),
    ``evidence`` (degenerate groups only) and ``members`` (custom partitions only); a file from elsewhere
    may leave any of them out (a hand-written one for a custom partition may give only ``members``).
    """

    kind: str = "other"  # layer kind from the trace metadata (see graftlab.kinds)
    block: Optional[int] = None  # transformer block index; None outside the blocks
    tied: bool = False  # D_beta ties the group to beta (Section 5)
    median: Optional[float] = None  # median ratio over the first window; None: no finite ratio there
    factor: Optional[float] = None  # the group's (first) factor, after stand-in and rounding
    n_finite: Optional[int] = None  # ratios the median used
    n_nonfinite: Optional[int] = None  # non-finite ratios skipped (D's step was zero)
    later_median: Optional[float] = None  # median over the trace's last window
    drift: Optional[float] = None  # later_median / median
    flags: str = ""  # why the group's own median is not used ("" when it is)
    stand_in: Optional[float] = None  # the median used instead, for a flagged group
    members: Optional[list[str]] = None  # parameter names of a custom-partition group
    grad_share: Optional[float] = None  # median of norm_g / the model's gradient norm; None: not recorded
    evidence: Optional[dict[str, Any]] = None  # why a degenerate group is one (graftlab.distill.degenerate.Evidence)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for key in FIELDS:
            v = getattr(self, key)
            if v is None and key in _OPTIONAL:
                continue
            kind = type(v)  # plain values as they are; anything else made strict JSON
            out[key] = (v if v is None or kind in (str, bool, int) or (kind is float and math.isfinite(v))
                        else jsonable(v))
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "GroupSource":
        """Validate a record read from JSON; unknown keys are left for newer writers."""
        if not isinstance(data, dict):
            raise GraftlabError(f"{where} must be an object, got {data!r}")
        return cls(**{name: _typed(name, data[name], where) for name in FIELDS if data.get(name) is not None})


FIELDS = tuple(f.name for f in fields(GroupSource))
_OPTIONAL = ("stand_in", "members", "evidence")  # left out of a record when None

# The JSON type of each field (float for the rest); null is allowed for every field.
_FIELD_TYPES = {"kind": str, "flags": str, "tied": bool, "block": int, "n_finite": int, "n_nonfinite": int,
                "members": list, "evidence": dict}
_WANT = {float: "a finite number", int: "a whole number >= 0", list: "a list of parameter names", str: "a string",
         bool: "true or false", dict: "an object"}


def _typed(name: str, v: Any, where: str) -> Any:
    kind = _FIELD_TYPES.get(name, float)
    try:
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an int beyond float range
        number = False
    if kind is float:
        ok = number
    elif kind is int:
        ok = number and v == int(v) and v >= 0
    elif kind is list:
        ok = isinstance(v, list) and all(isinstance(m, str) for m in v)
    else:
        ok = isinstance(v, kind)
    if not ok:
        raise GraftlabError(f"{where}.{name} must be {_WANT[kind]} or null, got {short_repr(v)}")
    return kind(v) if kind in (float, int) else v


def short_repr(v: Any, limit: int = 40) -> str:
    """``repr(v)``, cut to fit an error line (a 400-digit number, a long list)."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class GroupSources(Mapping[str, GroupSource]):
    """Checked records by group name; ``sources[name]`` is that group's :class:`GroupSource`.

    ``records``: the group -> record mapping (plain dicts as in the file), already checked by
    :func:`group_sources`; ``plain``: every record is strict JSON as it stands (no numpy numbers,
    NaN, or non-string keys), so a writer can encode it without copying it first.
    """

    def __init__(self, records: Mapping[str, Any], plain: bool):
        self.records = records
        self.plain = plain

    def __getitem__(self, group: str) -> GroupSource:
        return GroupSource.from_dict(self.records[group], f"source.groups[{group!r}]")

    def __iter__(self) -> Iterator[str]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def group_sources(source: Mapping[str, Any]) -> GroupSources:
    """``source["groups"]`` checked: every record an object whose fields hold their JSON type or null.

    Raises :class:`~graftlab.errors.GraftlabError` naming the first bad record and field. Records are
    read as saved: numpy numbers become Python ones, NaN (an undefined median) null.
    """
    info = source.get("groups") or {}
    if not isinstance(info, Mapping):
        raise GraftlabError(f"source.groups must be an object of group -> record, got {type(info).__name__}")
    if _plain(info):
        return GroupSources(info, plain=True)
    info = jsonable(info)
    for g, d in info.items():  # the per-record path finds the first bad record and says which
        GroupSource.from_dict(d, f"source.groups[{g!r}]")
    return GroupSources(info, plain=False)


def _plain(info: Mapping[str, Any]) -> bool:
    """Whether every record is a dict of known fields, each holding exactly its own JSON type (or
    None), finite, whole numbers >= 0 -- what graftlab writes -- checked one field at a time over
    all records (C-speed passes: 10^6 records in about a second). False sends the caller to the
    per-record path, which converts numpy numbers and names the first bad record."""
    records = list(info.values())
    if not records:
        return True
    if set(map(type, records)) != {dict} or set(map(type, info)) != {str}:
        return False
    shapes = set(map(tuple, records))  # the distinct key lists: a handful
    keys = set().union(*shapes)
    if not keys <= set(FIELDS):
        return False  # unknown keys (a newer writer's): their values are not checked here
    common = [k for k in FIELDS if all(k in s for s in shapes)]
    columns = {k: list(map(itemgetter(k), records)) for k in common}
    for k in keys.difference(common):
        columns[k] = [r[k] for r in records if k in r]
    return all(_plain_column(name, column) for name, column in columns.items())


def _plain_column(name: str, column: list) -> bool:
    kind = _FIELD_TYPES.get(name, float)
    types = set(map(type, column))
    types.discard(type(None))
    if not types:
        return True
    if types != {kind}:
        return False  # ints in a float field, floats in an int one: converted record by record
    if kind is float:
        return int(np.isfinite(np.array(column, dtype=np.float64)).sum()) == len(column) - column.count(None)
    if kind is int:
        present = column if None not in column else [v for v in column if v is not None]
        return min(present) >= 0 and max(present) < 2 ** 63  # a larger one: the record path decides
    present = [v for v in column if v is not None]
    if kind is list:
        return all(type(m) is str for v in present for m in v)
    if kind is dict:
        return all(jsonable(v) == v for v in present)
    return True
