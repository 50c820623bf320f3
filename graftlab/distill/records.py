"""Each group's :class:`~graftlab.corrections.GroupSource` in a distilled corrections file: what its
factor was made from (median, counts, drift, flags, evidence), for 10^5 to 10^6 groups at a time."""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pandas as pd

from graftlab.corrections import GroupSource
from graftlab.distill import degenerate
from graftlab.io.jsonable import jsonable


def group_records(groups: list[str], table: pd.DataFrame, rule: Any, first_win: pd.DataFrame,
             first_factor: pd.Series, later: pd.Series,
             evidence: dict[str, degenerate.Evidence]) -> dict[str, GroupSource]:
    """Each group's :class:`GroupSource`: what its factor was made from (columns taken out of
    pandas once: 10^5 to 10^6 groups are a Python loop over plain lists)."""
    stand_in = rule.stand_in(first_win["median"]).reindex(groups).tolist()
    median = first_win["median"].reindex(groups).to_numpy(np.float64)
    later_ = later.reindex(groups).to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        drift = np.where(median > 0, later_ / median, np.nan)
    cols = {
        "kind": rule.kinds.reindex(groups).tolist(), "tied": rule.tied.reindex(groups).astype(bool).tolist(),
        "median": median.tolist(), "factor": first_factor.reindex(groups).to_numpy(np.float64).tolist(),
        "n_finite": first_win["n_finite"].reindex(groups).astype(np.int64).tolist(),
        "n_nonfinite": first_win["n_nonfinite"].reindex(groups).astype(np.int64).tolist(),
        "later": later_.tolist(), "drift": drift.tolist(), "flags": rule.flags.reindex(groups).tolist(),
    }
    known = table.reindex(groups)
    blocks = known["block"].tolist() if "block" in known.columns else [None] * len(groups)
    members = known["members"].tolist() if "members" in known.columns else [None] * len(groups)
    out = {}
    for i, g in enumerate(groups):
        mem, ev, flag = members[i], evidence[g], cols["flags"][i]
        out[g] = GroupSource(
            kind=cols["kind"][i],
            block=_block(blocks[i]),
            tied=cols["tied"][i],
            median=_num(cols["median"][i]),
            factor=_num(cols["factor"][i]),
            n_finite=cols["n_finite"][i],
            n_nonfinite=cols["n_nonfinite"][i],
            later_median=_num(cols["later"][i]),
            drift=_num(cols["drift"][i]) if cols["median"][i] > 0 else None,
            flags=flag,
            stand_in=_num(stand_in[i]) if flag else None,
            members=([str(m) for m in mem] if isinstance(mem, (list, tuple)) and list(mem) != [g] else None),
            grad_share=_num(ev.grad_share),
            evidence=ev.to_dict() if ev.degenerate else None,
        )
    return out


def _num(v: Any) -> Optional[float]:
    """A finite float, else None (what :func:`jsonable` makes of a median)."""
    return float(v) if v is not None and math.isfinite(v) else None


def _block(v: Any) -> Optional[int]:
    """A block index from the metadata table (pandas turns int columns with None into floats)."""
    if v is None or type(v) is int:
        return v
    if type(v) is float:  # a column with missing blocks holds floats: NaN where there is none
        return int(v) if math.isfinite(v) else None
    v = jsonable(v)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
