"""Pure functions that turn per-group ratio series into corrections (the paper's Section 5).

Everything here works on plain arrays or on the long trace DataFrame of :mod:`graftlab.trace`
(columns ``step``, ``group``, ``ratio``, ...) and reads no files, so each function can be checked
against a direct reference. :mod:`graftlab.distill.pipeline` strings them together::

    df = read_trace(path, steps=(0, 2000))
    med = window_medians(df, 2000)                      # group, median, n_finite, n_nonfinite
    med["factor"] = round_dbeta(med.set_index("group")["median"], 500.0, in_block).values

Conventions:

- Non-finite ratios (D's step was zero, or overflow) are skipped and counted, never propagated.
- Medians are plain medians of the finite values (the mean of the two middle values for an even
  count), as ``numpy.median`` and ``statistics.median`` compute them.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Union

import numpy as np
import pandas as pd

from graftlab.distill import medians as engine
from graftlab.distill.degenerate import flag_window
from graftlab.errors import GraftlabError
from graftlab.kinds import whole_name

# D_beta keeps the non-tied groups inside this range of powers of ten (the paper's {0.1, 1, 10, 100}).
POW10_RANGE = (0.1, 100.0)



Values = Union[Mapping[str, float], pd.Series]


# --------------------------------------------------------------------------- filtering

def median_filter(values, width: int) -> np.ndarray:
    """Centred running median of odd ``width``; the output has the length of the input.

    Edge rule: the window shrinks at the ends (``out[i]`` is the median of
    ``values[max(0, i - h) : i + h + 1]`` with ``h = width // 2``), so the series is not shortened
    and no values are invented. Non-finite values are ignored inside each window; a window with no
    finite value gives NaN. ``width=1`` returns the finite values unchanged (non-finite -> NaN).
    Computed by :func:`graftlab.distill.medians.running_median` (exact, O(n log width)).

    >>> median_filter([1.0, 5.0, 2.0, float("nan"), 3.0], 3).tolist()
    [3.0, 2.0, 3.5, 2.5, 3.0]
    """
    width = engine.check_width(width)
    x = np.asarray(values, dtype=np.float64).copy()
    if x.ndim != 1:
        raise GraftlabError(f"median filter expects a 1-D series, got shape {x.shape}")
    x[~np.isfinite(x)] = np.nan
    return engine.running_median(x, width)


def _grid(df: pd.DataFrame) -> tuple[engine.Grid, np.ndarray, np.ndarray]:
    """``df``'s ratios as a :class:`~graftlab.distill.medians.Grid` (groups in order of first appearance),
    and each row's group index and step column in it."""
    codes, names = pd.factorize(df["group"])
    step = df["step"].to_numpy()
    g = engine.grid(step, codes, df["ratio"].to_numpy(dtype=np.float64), [str(n) for n in names])
    return g, codes, np.searchsorted(g.steps, step)


def filter_groups(df: pd.DataFrame, width: int) -> pd.DataFrame:
    """``df`` with each group's ``ratio`` series (in step order) median-filtered by ``width``.

    The unfiltered values move to ``ratio_raw``. Positions whose raw ratio was not finite stay NaN,
    so the counts of skipped steps in :func:`window_medians` still describe the recording.
    """
    width = engine.check_width(width)
    out = df.copy()
    raw = out["ratio"].to_numpy(dtype=np.float64)
    if len(out):
        g, rows, cols = _grid(out)
        filtered = g.filtered(width).values[rows, cols]
    else:
        filtered = raw.copy()
    out["ratio_raw"] = raw
    out["ratio"] = filtered
    return out


# --------------------------------------------------------------------------- medians

def group_order(df: pd.DataFrame) -> list[str]:
    """The groups of a long table, in order of first appearance."""
    return [str(g) for g in pd.unique(df["group"])]


def window_medians(df: pd.DataFrame, window: int, start: int = 0) -> pd.DataFrame:
    """Median of each group's ratios over steps ``[start, start + window)``.

    Returns one row per group (in order of first appearance in ``df``) with columns ``group``,
    ``median`` (NaN when the window holds no finite ratio), ``n_finite`` (ratios used) and
    ``n_nonfinite`` (rows skipped). Medians are exact (:meth:`graftlab.distill.medians.Grid.window`).
    """
    _check_window(window)
    groups = group_order(df)
    if df.empty:
        return pd.DataFrame({"group": groups, "median": np.nan, "n_finite": 0, "n_nonfinite": 0})
    g, _, _ = _grid(df)
    med, fin, non = g.window(start, start + window)
    return pd.DataFrame({"group": g.groups, "median": med, "n_finite": fin, "n_nonfinite": non})


def windowed_medians(df: pd.DataFrame, window: int, start: int = 0) -> pd.DataFrame:
    """:func:`window_medians` for consecutive windows ``[start + k*window, start + (k+1)*window)``.

    Long format, columns ``start``, ``group``, ``median``, ``n_finite``, ``n_nonfinite``; windows run
    up to the last step in ``df`` (the last one may be partial).
    """
    _check_window(window)
    if df.empty:
        return pd.DataFrame(columns=["start", "group", "median", "n_finite", "n_nonfinite"])
    g, _, _ = _grid(df)
    return windows_frame(g, window, start)


def windows_frame(grid: engine.Grid, window: int, start: int = 0) -> pd.DataFrame:
    """:func:`windowed_medians` of a :class:`~graftlab.distill.medians.Grid` (long format)."""
    starts, med, fin, non = grid.windows(window, start)
    n_groups = len(grid.groups)
    return pd.DataFrame({
        "start": np.repeat(starts, n_groups),
        "group": np.tile(np.array(grid.groups, dtype=object), len(starts)),
        "median": med.reshape(-1),
        "n_finite": fin.reshape(-1),
        "n_nonfinite": non.reshape(-1),
    })


def piecewise(table: pd.DataFrame, value: str = "median") -> dict[str, list[list]]:
    """Per-group piecewise-constant schedules ``[[start, factor], ...]`` from a windowed table
    (columns ``group``, ``start`` and ``value``; one row per group and window).

    Windows without a value (no finite ratio) keep the previous factor (the first defined factor
    for leading ones); consecutive equal factors are merged. The first start is always 0 so the
    schedule covers the whole run. Groups with no value in any window are left out. Worked as one
    (groups, windows) grid: 10^5 groups cost what building their lists costs.
    """
    if table.empty:
        return {}
    codes, names = pd.factorize(table["group"], sort=False)  # groups in order of first appearance
    at, starts = pd.factorize(table["start"], sort=True)
    grid = np.full((len(names), len(starts)), np.nan)
    grid[codes, at] = table[value].to_numpy(dtype=np.float64)
    grid[~np.isfinite(grid)] = np.nan
    kept = ~np.isnan(grid).all(axis=1)
    filled = pd.DataFrame(grid).ffill(axis=1).bfill(axis=1).to_numpy()
    new = np.ones(filled.shape, dtype=bool)
    new[:, 1:] = filled[:, 1:] != filled[:, :-1]  # a piece starts where the factor changes
    new[~kept] = False
    rows, cols = np.nonzero(new)  # row by row, windows in order
    first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    begin = np.asarray(starts, dtype=np.int64)[cols]
    begin[first] = 0
    begin, factor = begin.tolist(), filled[rows, cols].tolist()
    out: dict[str, list[list]] = {}
    for a, b in zip(first.tolist(), first[1:].tolist() + [len(rows)]):
        out[str(names[rows[a]])] = [[s, f] for s, f in zip(begin[a:b], factor[a:b])]
    return out


def schedule_medians(df: pd.DataFrame, window: int) -> dict[str, list[list]]:
    """Consecutive-window medians as per-group schedules ``{group: [[start_step, factor], ...]}``."""
    return piecewise(windowed_medians(df, window))


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise GraftlabError(f"{{window}} must be a positive number of steps, got {window!r}", param="window")


# --------------------------------------------------------------------------- rounding

def round_pow10(x: float) -> float:
    """Round a positive finite ``x`` DOWN to a power of ten: 18.8 -> 10, 0.45 -> 0.1, 100 -> 100."""
    x = float(x)
    if not math.isfinite(x) or x <= 0:
        raise GraftlabError(f"cannot round {x!r} to a power of ten: it must be positive and finite")
    e = math.floor(math.log10(x))
    # log10 is not exact near powers of ten: fix the exponent so that 10**e <= x < 10**(e+1).
    if 10.0 ** (e + 1) <= x:
        e += 1
    elif 10.0 ** e > x:
        e -= 1
    return float(10.0 ** e) if e < 0 else float(10 ** e)


def round_dbeta(medians: Values, beta: float, in_block: Values) -> pd.Series:
    """The paper's ``D_beta`` rounding (Section 5, Table 6b).

    Groups with ``in_block[group]`` true are tied to ``beta``; every other group is rounded down to
    a power of ten and clipped into ``{0.1, 1, 10, 100}``. With beta=500 the Table 5 medians give
    position embeddings 18.8 -> 10, word embeddings 312.9 -> 100, MLM pre-LN weights 62.8 -> 10, and
    500 for every group of the transformer layers.
    """
    med = pd.Series(medians, dtype=np.float64)
    tied = pd.Series(in_block).reindex(med.index).fillna(False).astype(bool)
    lo, hi = POW10_RANGE
    out = {}
    for name, m in med.items():
        out[name] = float(beta) if tied[name] else min(max(round_pow10(m), lo), hi)
    return pd.Series(out, dtype=np.float64).reindex(med.index)


# Tied groups whose first-window medians span more than this factor cannot share one beta well:
# distill warns (on small models block LayerNorms and biases sit 100-500x below Q/K).
SPREAD_WARN = 10.0

ATTENTION_KINDS = ("Q", "K", "V", "attn_out")


def attention_weights(groups: list[str], kinds: Values) -> pd.Series:
    """The groups the attention-only ``D_beta`` variant ties: attention weight matrices.

    A group is tied when its kind is Q, K, V or attn_out and its tensor is a weight (the name's last
    component ends in ``weight``), so attention biases, LayerNorms and feed-forward layers are rounded
    to powers of ten like the groups outside the blocks. This reads the paper's Section 5 wording
    ("tie the attention weight matrices") literally, where its Table 5 ties every block parameter.
    Returns a bool Series indexed by ``groups``.
    """
    kind = pd.Series(kinds).reindex(groups)
    names = pd.Series([whole_name(str(g)) for g in groups], dtype=object)
    weight = names.str.rsplit(".", n=1).str[-1].str.lower().str.endswith("weight")
    out = kind.astype(str).isin(ATTENTION_KINDS).to_numpy() & weight.to_numpy(dtype=bool)
    return pd.Series(out, index=groups, dtype=bool)


def tied_spread(medians: Values, tied: Values) -> float:
    """``max / min`` of the finite positive medians of the tied groups (NaN with fewer than two).

    D_beta replaces all of them by one beta, so a spread above :data:`SPREAD_WARN` means some tied
    group's factor is off by more than that factor from its own median.
    """
    med = pd.Series(medians, dtype=np.float64)
    mask = pd.Series(tied).reindex(med.index).fillna(False).astype(bool)
    vals = med[mask & np.isfinite(med) & (med > 0)].to_numpy()
    return float(vals.max() / vals.min()) if vals.size >= 2 else math.nan


def parse_round(spec: str) -> tuple[str, Optional[float]]:
    """Parse a rounding spec: ``"none"``, ``"pow10"``, ``"D<beta>"`` (the paper's D_beta: every
    transformer-block group tied to beta) or ``"DA<beta>"`` (only the attention weight matrices tied,
    see :func:`attention_weights`); beta positive and finite.

    >>> parse_round("D500")
    ('dbeta', 500.0)
    >>> parse_round("DA500")
    ('dbeta_attn', 500.0)
    """
    s = str(spec).strip()
    if s.lower() in ("none", "pow10"):
        return s.lower(), None
    m = re.fullmatch(r"([Dd])([Aa]?)(.+)", s)
    if m:
        # "DA" only before what reads as a number ("DA500", "DA-5", "DAinf"): "Dabc" and a lone
        # "DA" are D<beta> with a beta that is no number, and are told so in the form typed
        attn = bool(m.group(2)) and re.match(r"[\d.+-]|inf|nan", m.group(3), re.I) is not None
        text = m.group(3) if attn or not m.group(2) else m.group(2) + m.group(3)
        form = m.group(1) + (m.group(2) if attn else "")
        try:
            beta = float(text)
        except ValueError:
            beta = math.nan
        if math.isfinite(beta) and beta > 0:
            return ("dbeta_attn" if attn else "dbeta"), beta
        raise GraftlabError(f"{{round}} {spec!r}: {form}<beta> needs a positive finite beta, e.g. {form}500",
                            param="round")
    raise GraftlabError(f"{{round}} {spec!r} is not a rounding: expected none, pow10, D<beta> or DA<beta> (e.g. D500)",
                        param="round")


def apply_round(medians: Values, spec: str, in_block: Optional[Values] = None) -> pd.Series:
    """Round ``medians`` by a parsed-or-text spec (see :func:`parse_round`); ``in_block`` says which
    groups are tied to beta (for ``DA<beta>`` the caller passes :func:`attention_weights`)."""
    mode, beta = parse_round(spec)
    med = pd.Series(medians, dtype=np.float64)
    if mode == "none":
        return med.copy()
    if mode == "pow10":
        return med.map(round_pow10)
    return round_dbeta(med, beta, in_block if in_block is not None else pd.Series(False, index=med.index))


# --------------------------------------------------------------------------- groups

# The paper ties "all the parameter groups in the attention layers": in its Table 5 every parameter
# of a transformer layer (Q/K/V/out, FC1/FC2, the two LayerNorms, their biases) is named
# "Attention ...", and Table 6b sends layer-1 and layer-24 Q, K, V to beta. So every group with a
# transformer block index is tied, whatever its kind; embeddings, the MLM/NSP heads, the pooler
# and the embedding LayerNorm sit outside the blocks and are rounded.

MAX_REPEAT = 1000  # the largest {n} / {n,m} count a tie regex may hold: group names are short


def compile_tie(tie: str) -> "re.Pattern[str]":
    """The ``tie`` regex compiled, with its repetition counts bounded (``a{99999999999}`` overflows
    the regex engine and ``(a{1000}){1000}`` matches in time exponential in nothing a name needs).

    Raises:
        GraftlabError: not a valid regex, or a count above :data:`MAX_REPEAT` (``param="tie"``).
    """
    for m in re.finditer(r"\{(\d+)(?:,(\d*))?\}", tie):
        if max(int(m[1]), int(m[2] or 0)) > MAX_REPEAT:
            raise GraftlabError(f"{{tie}} {tie!r} repeats more than {MAX_REPEAT} times ({m[0]}): group names are "
                                "short; write a shorter count", param="tie")
    if len(tie) > 10_000:
        raise GraftlabError(f"{{tie}} is {len(tie)} characters long: at most 10000", param="tie")
    try:
        return re.compile(tie)
    except (re.error, OverflowError, RecursionError) as err:
        raise GraftlabError(f"{{tie}} {tie!r} is not a valid regex: {err}", param="tie") from None


def tied_groups(groups: list[str], table: pd.DataFrame, tie: Optional[str] = None) -> pd.Series:
    """Which groups ``D_beta`` ties to beta: those with a block index in the trace metadata.

    ``table`` is :func:`graftlab.trace.group_table` of the metadata. ``tie`` (a regex searched in
    each group name) replaces the metadata rule.
    """
    if tie is not None:
        rx = compile_tie(tie)
        return pd.Series([bool(rx.search(g)) for g in groups], index=groups, dtype=bool)
    if "block" not in table.columns:
        return pd.Series(False, index=groups, dtype=bool)
    block = table["block"]
    block = block[~block.index.duplicated()].reindex(groups)
    return pd.Series(block.notna().to_numpy(), index=groups, dtype=bool)


def group_kinds(groups: list[str], table: pd.DataFrame) -> pd.Series:
    """Each group's kind from the metadata (``other`` where the metadata does not say)."""
    if "kind" not in table.columns:
        return pd.Series("other", index=groups, dtype=object)
    kind = table["kind"]
    kind = kind[~kind.index.duplicated()].reindex(groups)
    kind = kind.where(kind.notna() & (kind.astype(str) != ""), "other")
    return pd.Series(kind.astype(str).to_numpy(dtype=object), index=groups, dtype=object)


# --------------------------------------------------------------------------- per-kind summary

def kind_summary(df: pd.DataFrame, meta: Optional[Mapping] = None) -> pd.DataFrame:
    """Per kind: groups, and the median, min and max over groups of each group's median ratio.

    ``df`` is a trace (columns ``group`` and ``ratio`` at least; :func:`graftlab.read_trace`).
    Non-finite ratios (D's step was zero) are skipped, and groups that
    :func:`graftlab.distill.degenerate.flag_window` flags (no finite ratio, or degenerate: the attention K
    bias, whose true gradient is zero; ``norm_g`` in ``df`` is its evidence) are kept out
    of the statistics and counted in ``flagged``; ``out.attrs["flagged"]`` maps them to the reason.
    ``meta`` defaults to ``df.attrs["graftlab"]``. Rows are kinds in :data:`graftlab.kinds.KINDS`
    order; a kind with only flagged groups has NaN statistics.
    """
    from graftlab.kinds import KINDS  # kinds imports torch; the rest of this module does not need it

    meta = meta if meta is not None else df.attrs.get("graftlab", {})
    names = [g["name"] for g in meta.get("groups") or []] or list(dict.fromkeys(df["group"]))
    kinds = {g["name"]: g.get("kind") or "other" for g in meta.get("groups") or []}
    finite = df[np.isfinite(df["ratio"].to_numpy(dtype=np.float64))]
    medians = finite.groupby("group", sort=False)["ratio"].median().reindex(names)
    # norm_g in df, when there, is the evidence
    flags, _, _ = flag_window(df, medians, kinds, precision=meta.get("precision"))
    frame = pd.DataFrame({"median": medians, "kind": [kinds.get(g, "other") for g in names],
                          "flagged": flags != ""})
    stats = frame[~frame["flagged"]].groupby("kind", sort=False)["median"].agg(["median", "min", "max"])
    by_kind = frame.groupby("kind", sort=False)
    out = by_kind.size().to_frame("groups").join(stats)
    out["flagged"] = by_kind["flagged"].sum().astype(int)
    out = out.reindex([k for k in KINDS if k in out.index])
    out.attrs["flagged"] = {g: f for g, f in flags.items() if f}
    return out
