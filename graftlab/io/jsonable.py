"""One rule for turning run records into strict JSON (corrections files, run metadata).

Records mix Python numbers with numpy scalars, tensors and NaN medians; ``json.dumps`` refuses the
first two and writes ``NaN`` for the last, which strict JSON readers (JavaScript, jq) reject.
"""
from __future__ import annotations

import math
from typing import Any, Mapping


def jsonable(value: Any) -> Any:
    """A strict-JSON copy of ``value``.

    Mappings become ``{str(key): ...}``; lists and tuples become lists; numpy scalars and arrays and
    torch tensors become Python numbers and (nested) lists; non-finite floats (NaN, inf) become
    ``None``; anything else that is not ``None``, bool, int, float or str becomes ``str(value)``.

    >>> import numpy as np
    >>> jsonable({"median": np.float32(2.5), "drift": float("nan"), 1: (np.int64(3), "x")})
    {'median': 2.5, 'drift': None, '1': [3, 'x']}
    """
    kind = type(value)  # the plain types first, by identity: records of 10^5 groups pass through here
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is dict:
        out = {}
        for k, v in value.items():
            t = type(v)
            out[k if type(k) is str else str(k)] = (
                v if t is str or t is int or t is bool or v is None or (t is float and math.isfinite(v))
                else jsonable(v))
        return out
    if kind is list:
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if not isinstance(value, (bool, int, float, str)) and callable(getattr(value, "tolist", None)):
        value = value.tolist()  # numpy scalar/array or torch tensor: Python numbers or nested lists
        if isinstance(value, list):
            return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
