"""The corrections file: :class:`Corrections`, its validation, and JSON/CSV I/O (:func:`save`,
:func:`load_corrections`). The format is in :mod:`graftlab.corrections`; the per-group records of
``source["groups"]`` in :mod:`graftlab.corrections.group_sources`."""
from __future__ import annotations

import csv
import io
import json
import math
import numbers
import sys
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import pandas as pd

from graftlab.io.fsutil import check_regular
from graftlab.corrections.group_sources import GroupSources, group_sources, short_repr
from graftlab.errors import GraftlabError
from graftlab.io.jsonable import jsonable
from graftlab.io.outputs import write_atomic, write_text
from graftlab.trace.outputs import check_output

FORMAT = "graftlab.corrections/1"
GLOBAL = "global"

PathLike = Union[str, os.PathLike]


@dataclass
class Corrections:
    """Static multipliers and/or piecewise-constant schedules on D's learning rate, per group."""

    multipliers: dict[str, float] = field(default_factory=dict)
    schedule: dict[str, list[list]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT}
        if self.multipliers:
            out["multipliers"] = {str(k): float(v) for k, v in self.multipliers.items()}
        if self.schedule:
            out["schedule"] = {str(k): [[int(s), float(f)] for s, f in v] for k, v in self.schedule.items()}
        out["source"] = self.source
        return out

    def validate(self) -> None:
        """The checks :func:`load_corrections` makes of a file, for corrections built in Python:
        every factor finite and positive, every schedule from step 0 with increasing starts, the
        ``source`` records typed. Raises :class:`~graftlab.errors.GraftlabError` naming the first fault."""
        _check(self._as_given(), Path("corrections"))

    def _as_given(self) -> dict[str, Any]:
        """The file's fields as they stand, unconverted (``to_dict`` would make True and "3" numbers)."""
        return {"format": FORMAT, "multipliers": self.multipliers, "schedule": self.schedule, "source": self.source}

    @property
    def direction_lr(self) -> Optional[float]:
        """D's learning rate when the trace was recorded: the base the factors are relative to."""
        lr = self.source.get("direction_lr")
        return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None

    @property
    def direction_optimizer(self) -> Optional[str]:
        """The name (``sgd``, ``adagrad``, ...) of D's optimizer in the recorded run, or None when the
        file does not say: the optimizer the factors were distilled for."""
        meta = _object(self.source.get("metadata"))  # a hand-edited file may hold anything there
        name = _object(meta.get("config")).get("direction")
        if isinstance(name, str) and name:
            return name.lower()
        cls = _object(meta.get("direction")).get("class")
        if isinstance(cls, str) and cls:  # "torch.optim.sgd.SGD" -> "sgd"
            return cls.rsplit(".", 1)[-1].lower()
        return None

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(list(self.multipliers) + list(self.schedule)))

    @property
    def group_sources(self) -> GroupSources:
        """``source["groups"]`` checked, as a mapping of group name -> :class:`GroupSource` (typed on
        lookup). Raises :class:`~graftlab.errors.GraftlabError` naming a malformed record."""
        return group_sources(self.source)

    def summary(self) -> pd.DataFrame:
        """One row per group: kind, median, factor, counts, drift, flags (from ``source``)."""
        records = self.group_sources.records
        groups = self.groups
        empty: dict[str, Any] = {}
        rec = [records.get(g) or empty for g in groups]

        def column(name: str, default: Any = None) -> list:
            return [default if r.get(name) is None else r[name] for r in rec]

        return pd.DataFrame({
            "group": groups,
            "kind": column("kind", "other"),
            "median": np.array(column("median", math.nan), dtype=np.float64),
            "factor": np.array([self.multipliers.get(g, math.nan) for g in groups], dtype=np.float64),
            "n_finite": column("n_finite"),
            "n_nonfinite": column("n_nonfinite"),
            "drift": np.array(column("drift", math.nan), dtype=np.float64),
            "flags": column("flags", ""),
            "pieces": [len(self.schedule.get(g, [])) for g in groups],
        })

    def kind(self, group: str) -> str:
        record = self.group_sources.records.get(group) or {}
        return record.get("kind") or "other"

    _SHOWN = 8  # groups a repr lists; the whole table is summary()

    def __repr__(self) -> str:
        """One line saying what the file holds, then its first groups and factors (not a screenful:
        a BERT-base file has 200 groups and a per-group schedule thousands of pieces)."""
        what = []
        if self.multipliers:
            what.append(f"{len(self.multipliers)} static multiplier(s)")
        if self.schedule:
            pieces = sum(len(p) for p in self.schedule.values())
            what.append(f"schedule(s) for {len(self.schedule)} group(s), {pieces} piece(s)")
        src = self.source
        base = f", relative to D's lr {self.direction_lr:g}" if self.direction_lr is not None else ""
        origin = f" from {src['trace']}" if src.get("trace") else ""
        head = (f"Corrections({' and '.join(what) or 'empty'}{origin}"
                + (f", round {src['round']}" if src.get("round") else "") + f"{base})")
        lines = [head]
        groups = self.groups
        width = min(max((len(g) for g in groups[:self._SHOWN]), default=0), 60)
        for g in groups[:self._SHOWN]:
            if g in self.multipliers:
                value = f"x {self.multipliers[g]:.4g}"
            else:
                p = self.schedule[g]
                value = f"schedule {p[0][1]:.4g} .. {p[-1][1]:.4g} ({len(p)} pieces)"
            lines.append(f"  {g:<{width}}  {value}")
        if len(groups) > self._SHOWN:
            lines.append(f"  ... {len(groups) - self._SHOWN} more (corrections.summary() lists every group)")
        return "\n".join(lines)


def _object(value: Any) -> dict:
    """``value`` when it is a JSON object, else an empty one: the file does not say."""
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- save / load

# a text cell a spreadsheet would run as a formula (CSV injection): OWASP's list of leading characters
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """A text cell as the CSV export writes it: one starting like a formula gets a leading ``'``,
    which spreadsheets show as text and strip (``=HYPERLINK(...)`` stays a name, never a formula)."""
    text = str(text)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _csv_text(c: Corrections) -> str:
    kinds = {csv_cell(g): csv_cell(r.get("kind") or "other") for g, r in c.group_sources.records.items()}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if c.schedule:
        w.writerow(["group", "kind", "start", "factor"])
        for g, f in c.multipliers.items():
            w.writerow([csv_cell(g), kinds.get(csv_cell(g), "other"), "", repr(float(f))])
        for g, pieces in c.schedule.items():
            for s, f in pieces:
                w.writerow([csv_cell(g), kinds.get(csv_cell(g), "other"), int(s), repr(float(f))])
    else:
        w.writerow(["group", "kind", "factor"])
        for g, f in c.multipliers.items():
            w.writerow([csv_cell(g), kinds.get(csv_cell(g), "other"), repr(float(f))])
    return buf.getvalue()


def save(corrections: Corrections, path: PathLike, *, format: str = "json", overwrite: bool = False) -> Path:
    """Write ``corrections`` as JSON (the contract) or CSV (group, kind[, start], factor).

    Never replaces an existing file unless ``overwrite``; the file is written under a temporary
    name and renamed, so an interrupted write leaves no partial file.
    """
    path = Path(path)
    if format not in ("json", "csv"):
        raise GraftlabError(f"unknown corrections format {format!r}: expected json or csv")
    sources = _check(corrections._as_given(), path)[1]
    data = corrections.to_dict()
    check_output(path, "corrections file", overwrite=overwrite)  # not a folder, nor inside or over a trace
    if not path.parent.exists():
        raise GraftlabError(f"{path.parent}: no such directory")
    # a hidden temporary file renamed into place; one that appeared meanwhile is still not replaced
    if format == "csv":
        return write_text(path, _csv_text(corrections), overwrite=overwrite, what="corrections file")
    chunks = _json_chunks(_strict(data, sources))

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(chunks)

    return write_atomic(path, write, overwrite=overwrite, what="corrections file")


def _strict(data: dict[str, Any], sources: GroupSources) -> dict[str, Any]:
    """``data`` as strict JSON; the group records as they are when already plain (no copy of 10^6 records)."""
    if not sources.plain:
        return jsonable(data)
    out = jsonable({k: v for k, v in data.items() if k != "source"})
    out["source"] = {str(k): (sources.records if k == "groups" else jsonable(v)) for k, v in data["source"].items()}
    return out


_ONE_LINE = 50  # objects with more entries than this (one per group) get one compact line per entry


def _json_chunks(data: Any, indent: str = "") -> Iterator[str]:
    """``data`` as indented JSON, in pieces written one after the other (a file of 10^6 groups is
    never one string in memory), except that an object of many entries (a record per group) puts
    each entry on one compact line: json's indenting encoder is pure Python, 20 s for 10^5 groups,
    where the compact one is C. Strict JSON (no NaN)."""
    end = "" if indent else "\n"
    if not isinstance(data, dict) or not data:
        yield json.dumps(data, allow_nan=False) + end
        return
    inner = indent + " "
    encode = json.JSONEncoder(allow_nan=False).encode  # one encoder for every entry
    yield "{"
    for i, (k, v) in enumerate(data.items()):
        yield f"{',' if i else ''}\n{inner}{encode(k)}: "
        if len(data) > _ONE_LINE:
            yield encode(v)
        elif isinstance(v, dict):
            yield from _json_chunks(v, inner)
        else:
            yield json.dumps(v, indent=1, allow_nan=False).replace("\n", "\n" + inner)
    yield f"\n{indent}}}{end}"


def _finite(v: Any) -> bool:
    """A finite JSON number (an integer beyond float range, like 1e400 written out, is not)."""
    try:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:
        return False


def _factor(v: Any, where: str, path: Path) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):  # numpy numbers are Real too
        raise GraftlabError(f"{path}: {where} is {short_repr(v)}, not a number")
    if not _finite(v) or v <= 0:
        raise GraftlabError(f"{path}: {where} is {short_repr(v)}; factors must be finite and positive")
    if float(v) < sys.float_info.min:  # subnormal: 1e-320 x lr is 0 or noise in any float format
        raise GraftlabError(f"{path}: {where} is {short_repr(v)}; factors must be normal numbers "
                            f"(>= {sys.float_info.min:.3g}), not subnormal")
    return float(v)


def _factors(mult: dict, path: Path) -> dict[str, float]:
    """Validated static factors: checked as one array when all are plain floats (10^6 groups), else
    one by one (which names the first bad one)."""
    values = list(mult.values())
    if all(type(g) is str for g in mult) and set(map(type, values)) <= {float}:
        a = np.array(values, dtype=np.float64)
        if (np.isfinite(a) & (a >= sys.float_info.min)).all():
            return dict(mult)
    return {str(g): _factor(v, f"multiplier of {g}", path) for g, v in mult.items()}


def _validate(data: Any, path: Path) -> Corrections:
    return _check(data, path)[0]


def _check(data: Any, path: Path) -> tuple[Corrections, GroupSources]:
    if not isinstance(data, dict):
        raise GraftlabError(f"{path}: not a corrections file (expected a JSON object)")
    fmt = data.get("format")
    if not isinstance(fmt, str) or not fmt.startswith("graftlab.corrections/"):
        said = "no \"format\" key" if fmt is None else f"format {fmt!r}"
        raise GraftlabError(f"{path}: not a graftlab corrections file ({said}; expected \"format\": \"{FORMAT}\")")
    if fmt != FORMAT:
        raise GraftlabError(f"{path}: corrections format {fmt} is not one this graftlab reads ({FORMAT})")
    mult = data.get("multipliers") or {}
    sched = data.get("schedule") or {}
    source = data.get("source") or {}
    if not isinstance(mult, dict):
        raise GraftlabError(f"{path}: 'multipliers' must be an object of group -> factor")
    if not isinstance(sched, dict):
        raise GraftlabError(f"{path}: 'schedule' must be an object of group -> [[start, factor], ...]")
    if not isinstance(source, dict):
        raise GraftlabError(f"{path}: 'source' must be an object")
    for key in ("metadata", "groups"):
        if source.get(key) is not None and not isinstance(source[key], dict):
            raise GraftlabError(f"{path}: 'source.{key}' must be an object, not {type(source[key]).__name__}")
    named = [*mult, *sched]
    if "" in named:
        raise GraftlabError(f"{path}: a factor is given for the group '' (a group needs a name)")
    if not mult and not sched:
        raise GraftlabError(f"{path}: corrections file has neither multipliers nor a schedule")
    multipliers = _factors(mult, path)
    schedule = {str(g): _pieces(g, pieces, path) for g, pieces in sched.items()}
    try:
        sources = group_sources(source)
    except GraftlabError as err:
        raise GraftlabError(f"{path}: {err}") from None
    return Corrections(multipliers, schedule, source), sources


def _pieces(g: str, pieces: Any, path: Path) -> list[list]:
    """A validated ``[[start, factor], ...]`` schedule: starts 0, then increasing step numbers."""
    if not isinstance(pieces, list) or not pieces:
        raise GraftlabError(f"{path}: schedule of {g} must be a non-empty list of [start, factor]")
    out: list[list] = []
    for i, piece in enumerate(pieces):
        if not isinstance(piece, (list, tuple)) or len(piece) != 2:
            raise GraftlabError(f"{path}: schedule of {g}, entry {i}: expected [start, factor], got {short_repr(piece)}")
        s, f = piece
        if not _finite(s) or s != int(s) or s < 0:
            raise GraftlabError(f"{path}: schedule of {g}, entry {i}: start {short_repr(s)} is not a step number")
        s = int(s)
        if not out and s != 0:
            raise GraftlabError(f"{path}: schedule of {g} must start at step 0, not {s}")
        if out and s <= out[-1][0]:
            raise GraftlabError(f"{path}: schedule of {g}: starts must increase ({out[-1][0]} then {s})")
        out.append([s, _factor(f, f"schedule of {g} at step {s}", path)])
    return out


def load_corrections(path: PathLike) -> Corrections:
    """Read and validate a corrections JSON file (the format in the module doc).

    The factors are the paper's distilled per-layer corrections (Section 5: medians of the ratios
    over the first N steps, optionally D_beta-rounded as for Table 6b) or a global schedule (Figure
    4): dimensionless multipliers of the learning rate D had when the trace was recorded
    (``source["direction_lr"]``). Raises :class:`~graftlab.errors.GraftlabError`, one line naming
    the file, when it is missing, unreadable, not JSON, the CSV export, another format or version,
    or holds a factor that is not finite and positive, a schedule that does not start at step 0
    with increasing starts, or a malformed ``source["groups"]`` record.
    """
    path = Path(path)
    if not path.exists():
        raise GraftlabError(f"{path}: no such corrections file")
    if path.is_dir():
        raise GraftlabError(f"{path}: is a directory, not a corrections file")
    check_regular(path, "corrections file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise GraftlabError(f"{path}: cannot read corrections file ({err})") from None
    if text.lstrip().startswith("group,"):
        raise GraftlabError(f"{path}: this is the CSV export; training reads the JSON corrections file")
    try:
        data = json.loads(text)
    except ValueError as err:
        raise GraftlabError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise GraftlabError(f"{path}: not a corrections file (JSON nested too deeply to read)") from None
    return _validate(data, path)
