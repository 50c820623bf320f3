"""Each group's record in a distilled corrections file (``source["groups"][name]``, the fields of
:class:`~graftlab.corrections.GroupSource`): what its factor was made from (median, counts, drift,
flags, evidence), for 10^5 to 10^6 groups at a time."""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pandas as pd

from graftlab.distill import degenerate
from graftlab.io.jsonable import jsonable


def group_records(groups: list[str], table: pd.DataFrame, rule: Any, first_win: pd.DataFrame,
                  first_factor: pd.Series, later: pd.Series,
                  evidence: degenerate.Assessment) -> dict[str, dict[str, Any]]:
    """Each group's record as a plain JSON-ready dict, keys in :class:`GroupSource` field order
    (``stand_in`` for flagged groups only, ``members`` for custom-partition groups only, ``evidence``
    for degenerate groups only). Built column by column: a record per group is the one Python object
    10^6 groups cannot avoid."""
    stand_in = _nums(rule.stand_in(first_win["median"]).reindex(groups))
    median = first_win["median"].reindex(groups).to_numpy(np.float64)
    later_ = later.reindex(groups).to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        drift = np.where(median > 0, later_ / median, np.nan)
    flags = rule.flags.reindex(groups).tolist()
    known = table.reindex(groups)
    blocks = (list(map(_block, known["block"].tolist())) if "block" in known.columns else [None] * len(groups))
    members = known["members"].tolist() if "members" in known.columns else None
    shares = _nums(evidence.frame["grad_share"].reindex(groups))
    out = {
        g: {"kind": k, "block": b, "tied": t, "median": m, "factor": f, "n_finite": nf, "n_nonfinite": nn,
            "later_median": lm, "drift": d, "flags": fl, "grad_share": gs}
        for g, k, b, t, m, f, nf, nn, lm, d, fl, gs in zip(
            groups, rule.kinds.reindex(groups).tolist(), blocks, rule.tied.reindex(groups).astype(bool).tolist(),
            _nums(median), _nums(first_factor.reindex(groups)),
            first_win["n_finite"].reindex(groups).astype(np.int64).tolist(),
            first_win["n_nonfinite"].reindex(groups).astype(np.int64).tolist(),
            _nums(later_), _nums(drift), flags, shares)
    }
    # the optional fields, in their GroupSource place: rare, so each is a pass over the few groups it has
    for i in [i for i, f in enumerate(flags) if f and stand_in[i] is not None]:
        _insert(out[groups[i]], "stand_in", stand_in[i], before="grad_share")
    if members is not None:
        for g, mem in zip(groups, members):
            if isinstance(mem, (list, tuple)) and list(mem) != [g]:
                _insert(out[g], "members", [str(m) for m in mem], before="grad_share")
    for g in evidence.degenerate:
        out[g]["evidence"] = evidence[g].to_dict()
    return out


def _insert(record: dict[str, Any], key: str, value: Any, *, before: str) -> None:
    """``record[key] = value`` placed before ``before`` (files list fields in one order)."""
    tail = {k: record.pop(k) for k in list(record)[list(record).index(before):]}
    record[key] = value
    record.update(tail)


def _nums(values: Any) -> list[Optional[float]]:
    """Finite floats as Python floats, the rest (NaN, inf) as None: what a corrections file holds."""
    a = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(a), a, None).tolist() if len(a) else []


def _block(v: Any) -> Optional[int]:
    """A block index from the metadata table (pandas turns int columns with None into floats)."""
    if v is None or type(v) is int:
        return v
    if type(v) is float:  # a column with missing blocks holds floats: NaN where there is none
        return int(v) if math.isfinite(v) else None
    v = jsonable(v)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
