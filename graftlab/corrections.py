"""The corrections contract: the file ``graftlab distill`` writes and ``graftlab train`` reads.

A corrections file is JSON::

    {"format": "graftlab.corrections/1",
     "multipliers": {"encoder.0.attn.q.weight": 500.0, ...},      # static factors per group
     "schedule": {"global": [[0, 0.02], [2000, 0.05]]},           # piecewise-constant factors
     "source": {"trace": "...", "window": 2000, "round": "D500", "direction_lr": 0.1, ...}}

Factors multiply the learning rate D had when the trace was recorded (``source["direction_lr"]``).
A group named ``global`` applies to every parameter. A file holds ``multipliers``, ``schedule`` or
both.

Usage in a training loop (what ``graftlab train`` does)::

    corr = load_corrections("run.corrections.json")
    applied = apply(corr, list(model.named_parameters()), base_lr=0.1)
    opt = torch.optim.SGD(applied.param_groups, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, applied.lr_lambda(run_schedule))
    for step in range(steps):
        ...; opt.step(); sched.step()       # the factor at step t applies to update t

``run_schedule`` is the run's own ``step -> factor`` schedule (warmup, decay), or None.
"""
from __future__ import annotations

import bisect
import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import pandas as pd

from graftlab.errors import GraftlabError

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

    @property
    def direction_lr(self) -> Optional[float]:
        """D's learning rate when the trace was recorded: the base the factors are relative to."""
        lr = self.source.get("direction_lr")
        return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(list(self.multipliers) + list(self.schedule)))

    def summary(self) -> pd.DataFrame:
        """One row per group: kind, median, factor, counts, drift, flags (from ``source``)."""
        info = self.source.get("groups") or {}
        rows = []
        for g in self.groups:
            d = info.get(g, {}) if isinstance(info, dict) else {}
            rows.append(
                {
                    "group": g,
                    "kind": d.get("kind", "other"),
                    "median": d.get("median", math.nan),
                    "factor": self.multipliers.get(g, math.nan),
                    "n_finite": d.get("n_finite"),
                    "n_nonfinite": d.get("n_nonfinite"),
                    "drift": d.get("drift", math.nan),
                    "flags": d.get("flags", ""),
                    "pieces": len(self.schedule.get(g, [])),
                }
            )
        return pd.DataFrame(rows)

    def kind(self, group: str) -> str:
        info = (self.source.get("groups") or {}).get(group) or {}
        return str(info.get("kind") or "other")


# --------------------------------------------------------------------------- save / load

def _to_json(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (strict JSON), numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _csv_text(c: Corrections) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if c.schedule:
        w.writerow(["group", "kind", "start", "factor"])
        for g, f in c.multipliers.items():
            w.writerow([g, c.kind(g), "", repr(float(f))])
        for g, pieces in c.schedule.items():
            for s, f in pieces:
                w.writerow([g, c.kind(g), int(s), repr(float(f))])
    else:
        w.writerow(["group", "kind", "factor"])
        for g, f in c.multipliers.items():
            w.writerow([g, c.kind(g), repr(float(f))])
    return buf.getvalue()


def save(corrections: Corrections, path: PathLike, *, format: str = "json", overwrite: bool = False) -> Path:
    """Write ``corrections`` as JSON (the contract) or CSV (group, kind[, start], factor).

    Never replaces an existing file unless ``overwrite``; the file is written under a temporary
    name and renamed, so an interrupted write leaves no partial file.
    """
    path = Path(path)
    if format not in ("json", "csv"):
        raise GraftlabError(f"unknown corrections format {format!r}: expected json or csv")
    _validate(corrections.to_dict(), path)
    if path.exists() and not overwrite:
        raise GraftlabError(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and path.is_dir():
        raise GraftlabError(f"{path} is a directory")
    if not path.parent.exists():
        raise GraftlabError(f"{path.parent}: no such directory")
    text = (
        json.dumps(_to_json(corrections.to_dict()), indent=1, allow_nan=False) + "\n"
        if format == "json"
        else _csv_text(corrections)
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if not overwrite and path.exists():  # appeared meanwhile
            raise GraftlabError(f"{path} already exists; pass --overwrite to replace it")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _factor(v: Any, where: str, path: Path) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise GraftlabError(f"{path}: {where} is {v!r}, not a number")
    if not math.isfinite(v) or v <= 0:
        raise GraftlabError(f"{path}: {where} is {v!r}; factors must be finite and positive")
    return float(v)


def _validate(data: Any, path: Path) -> Corrections:
    if not isinstance(data, dict):
        raise GraftlabError(f"{path}: not a corrections file (expected a JSON object)")
    fmt = data.get("format")
    if not isinstance(fmt, str) or not fmt.startswith("graftlab.corrections/"):
        raise GraftlabError(f"{path}: not a graftlab corrections file (format {fmt!r})")
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
    if not mult and not sched:
        raise GraftlabError(f"{path}: corrections file has neither multipliers nor a schedule")
    multipliers = {str(g): _factor(v, f"multiplier of {g}", path) for g, v in mult.items()}
    schedule: dict[str, list[list]] = {}
    for g, pieces in sched.items():
        if not isinstance(pieces, list) or not pieces:
            raise GraftlabError(f"{path}: schedule of {g} must be a non-empty list of [start, factor]")
        out = []
        for i, piece in enumerate(pieces):
            if not isinstance(piece, (list, tuple)) or len(piece) != 2:
                raise GraftlabError(f"{path}: schedule of {g}, entry {i}: expected [start, factor], got {piece!r}")
            s, f = piece
            if isinstance(s, bool) or not isinstance(s, (int, float)) or s != int(s) or s < 0:
                raise GraftlabError(f"{path}: schedule of {g}, entry {i}: start {s!r} is not a step number")
            s = int(s)
            if not out and s != 0:
                raise GraftlabError(f"{path}: schedule of {g} must start at step 0, not {s}")
            if out and s <= out[-1][0]:
                raise GraftlabError(f"{path}: schedule of {g}: starts must increase ({out[-1][0]} then {s})")
            out.append([s, _factor(f, f"schedule of {g} at step {s}", path)])
        schedule[str(g)] = out
    return Corrections(multipliers, schedule, source)


def load_corrections(path: PathLike) -> Corrections:
    """Read and validate a corrections JSON file; every problem is a one-line GraftlabError."""
    path = Path(path)
    if not path.exists():
        raise GraftlabError(f"{path}: no such corrections file")
    if path.is_dir():
        raise GraftlabError(f"{path}: is a directory, not a corrections file")
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
    return _validate(data, path)


# --------------------------------------------------------------------------- apply

class Piecewise:
    """``step -> factor`` of a piecewise-constant schedule ``[[start, factor], ...]``.

    A plain object (not a lambda) so LambdaLR can save it in its state_dict. Optionally multiplied
    by other ``step -> factor`` callables (the run's own schedule, a global correction).
    """

    def __init__(self, pieces: Sequence[Sequence[float]], *others: Optional[Callable[[int], float]]):
        self.starts = [int(s) for s, _ in pieces]
        self.factors = [float(f) for _, f in pieces]
        self.others = [o for o in others if o is not None]

    def __call__(self, step: int) -> float:
        i = bisect.bisect_right(self.starts, int(step)) - 1
        f = self.factors[max(i, 0)]
        for o in self.others:
            f *= o(step)
        return f

    def __repr__(self) -> str:
        return f"Piecewise({[list(p) for p in zip(self.starts, self.factors)]})"


class _Product:
    def __init__(self, *fs: Optional[Callable[[int], float]]):
        self.fs = [f for f in fs if f is not None]

    def __call__(self, step: int) -> float:
        out = 1.0
        for f in self.fs:
            out *= f(step)
        return out


@dataclass
class Applied:
    """A corrections file turned into optimizer settings for one model.

    - ``param_groups``: one torch param-group dict per parameter, ``{"params": [p], "lr":
      base_lr * multiplier, "name": name}``, in ``named_params`` order; pass it to the optimizer.
    - ``lr_factor``: the global schedule (``step -> factor``), or None without one.
    - ``group_lr_factors``: with per-group schedules, one ``step -> factor`` per param group (the
      global factor included), else None. A LambdaLR over the optimizer must use this list.
    - ``missing``: model parameters the file had no factor for (factor 1; only with allow_missing).
    - ``unknown``: file groups that matched no parameter (ignored; only with allow_missing).
    """

    param_groups: list[dict[str, Any]]
    lr_factor: Optional[Callable[[int], float]] = None
    group_lr_factors: Optional[list[Callable[[int], float]]] = None
    missing: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def lr_lambda(self, run_schedule: Optional[Callable[[int], float]] = None):
        """What to give ``torch.optim.lr_scheduler.LambdaLR``: the corrections' schedule composed
        (multiplied) with the run's own ``step -> factor`` schedule. A single callable unless the
        file has per-group schedules, then a list with one callable per param group."""
        if self.group_lr_factors is not None:
            return [_Product(f, run_schedule) for f in self.group_lr_factors]
        return _Product(self.lr_factor, run_schedule)

    def factor_at(self, step: int) -> list[float]:
        """Each param group's total factor on ``base_lr`` at ``step`` (multiplier x schedule)."""
        base = [g["factor"] for g in self.param_groups]
        if self.group_lr_factors is not None:
            return [b * f(step) for b, f in zip(base, self.group_lr_factors)]
        s = self.lr_factor(step) if self.lr_factor is not None else 1.0
        return [b * s for b in base]


def _members(corrections: Corrections) -> dict[str, list[str]]:
    """Group -> parameter names, for custom partitions recorded in ``source['groups']``."""
    info = corrections.source.get("groups") or {}
    out = {}
    if isinstance(info, dict):
        for g, d in info.items():
            members = d.get("members") if isinstance(d, dict) else None
            if isinstance(members, list) and members and members != [g]:
                out[str(g)] = [str(m) for m in members]
    return out


def _listing(names: Sequence[str], limit: int = 5) -> str:
    head = ", ".join(names[:limit])
    return head + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def apply(
    corrections: Corrections,
    named_params: list[tuple[str, Any]],
    base_lr: float,
    *,
    allow_missing: bool = False,
) -> Applied:
    """Turn ``corrections`` into per-parameter learning rates and schedules for a plain optimizer.

    Static multipliers become per-group lrs (``base_lr * factor``); a ``global`` multiplier applies
    to every parameter. Group names are matched to parameter names (layer traces) or through the
    members recorded in ``source['groups']`` (custom partitions). File groups that match no
    parameter (a file from another model) and parameters the file does not cover are errors that
    list them, unless ``allow_missing`` (then uncovered parameters keep factor 1, listed in
    ``Applied.missing``).
    """
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not math.isfinite(base_lr) or base_lr <= 0:
        raise GraftlabError(f"base learning rate must be positive and finite, got {base_lr!r}")
    names = [str(n) for n, _ in named_params]
    if len(set(names)) != len(names):
        raise GraftlabError("parameter names must be unique to apply corrections")
    members = _members(corrections)
    index = {n: i for i, n in enumerate(names)}

    def targets(group: str) -> list[int]:
        if group == GLOBAL and GLOBAL not in index:
            return list(range(len(names)))
        if group in index:
            return [index[group]]
        return [index[m] for m in members.get(group, []) if m in index]

    unknown = [g for g in corrections.groups if not targets(g)]
    if unknown and not allow_missing:
        raise GraftlabError(
            f"{len(unknown)} group(s) in the corrections match no parameter of this model "
            f"(a file from another model?): {_listing(unknown)}; pass --allow-missing to ignore them"
        )

    mult = [1.0] * len(names)
    covered = [False] * len(names)
    for g, f in corrections.multipliers.items():
        for i in targets(g):
            mult[i] *= float(f)
            covered[i] = True
    group_sched: list[list[Piecewise]] = [[] for _ in names]
    global_sched: Optional[Piecewise] = None
    for g, pieces in corrections.schedule.items():
        t = targets(g)
        if g == GLOBAL and len(t) == len(names) and GLOBAL not in index:
            global_sched = Piecewise(pieces)
        else:
            for i in t:
                group_sched[i].append(Piecewise(pieces))
        for i in t:
            covered[i] = True
    missing = [n for n, c in zip(names, covered) if not c]
    if missing and not allow_missing:
        raise GraftlabError(
            f"{len(missing)} model parameter(s) have no correction in the file: {_listing(missing)}; "
            "pass --allow-missing to keep factor 1 for them"
        )

    param_groups = [
        {"params": [p], "lr": base_lr * m, "name": n, "factor": m}
        for (n, p), m in zip(named_params, mult)
    ]
    group_factors = None
    if any(group_sched):
        group_factors = [_Product(global_sched, *s) for s in group_sched]
    return Applied(
        param_groups=param_groups,
        lr_factor=global_sched if group_factors is None else None,
        group_lr_factors=group_factors,
        missing=missing,
        unknown=unknown,
    )
