"""Degenerate groups: where D's step is float noise, so the group's ratio is no correction.

A group is degenerate when its true gradient is (near) zero: D's step is then made of rounding
error, and ``||w_M - w_t|| / ||w_D - w_t||`` measures nothing but how the two optimizers scale
noise. The standard case is the attention key bias: ``softmax_j(q . (k_j + b)) = softmax_j(q . k_j)``
because ``q . b`` is the same for every key ``j``, so the loss ignores ``b`` (the paper's Table 5
shows its ratio as 154101). A large ratio alone is not degenerate: on Hugging Face BertForMaskedLM
the Q/K weights' medians are 100-540 against a model median near 1, and they are the corrections
the method exists to find (Table 5: Q/K 470-1090 beside embeddings at 0.45-19). So the decision reads
what the step is made of, never where a ratio sits among the others:

1. Gradient (trace column ``norm_g``, the group's gradient norm, which :class:`graftlab.Recorder`
   records). Per step, ``share = norm_g / ||g_model||`` with ``||g_model||`` the root sum of squares
   of all groups' ``norm_g`` at that step; the median over the window's steps is compared with
   :data:`NOISE_SHARE`, float32's machine epsilon: a gradient below the float32 resolution of the
   model's gradient is rounding error. When the column is there it decides alone. Measured (Adam 1e-3
   # SGD 0.1 momentum 0.9, layer-wise): key biases 8e-12..1.2e-11 and the smallest real group 1.3e-5
   (a Q bias) on HF BERT (2 layers, d=64); every GPT-2 group (2 layers, d=64) 1.5e-3 or more.
   Runs in a coarser dtype (the trace metadata's ``precision``: bfloat16 or float16 weights, or
   autocast) leave more noise in a gradient-free group, while real groups keep their shares: the
   gradient-free-by-construction groups (rule 2's key bias) are then judged against
   :func:`noise_share`, ``eps(precision) * 2**-7``, every other group still against
   :data:`NOISE_SHARE`. Measured on graftlab's ``bert`` and ``gpt`` tiny/small (same optimizers,
   20-80 steps, CPU): key biases 8e-8..1.9e-6 in bfloat16 (weights or autocast; so float32's bound
   missed them) and 3.4e-6..3.9e-6 under float16 autocast, against the bounds 6.1e-5 and 7.6e-6;
   Q/K/V weights 8.4e-5 or more and Q biases 3.2e-6 or more in every dtype. A single bound for all
   groups cannot be drawn there: bfloat16 key-bias noise (up to 1.9e-6) and real Q biases (from
   3.2e-6) nearly touch. Traces without ``precision`` are judged as float32.
2. Structure and ratio (traces without ``norm_g``: older traces, other tools, the paper's Table 5).
   An attention key bias (kind ``K``, tensor ``bias``) is gradient-free by construction; it is flagged
   when its median ratio is at least :data:`SIBLING_FACTOR` times that of its own projection's
   weight (``...key.bias`` against ``...key.weight``), as float noise makes it: Table 5 154101 against
   467, HF BERT 1.04e5 against 122-489, graftlab's ``bert`` 1.7e5 against 230-250. A real bias's
   median sits within 0.1-2x of its weight's in all of them. Without the weight in the trace the key
   bias is not flagged (rotary embeddings, applied after the bias, give it a real gradient; only the
   numbers can tell).
3. Opt-in ``outlier``: a median above ``outlier`` times the median over groups. This depends on the
   distribution of ratios (a user's per-group learning rates move it), so it is off by default.

Every verdict comes with its :class:`Evidence`, which ``graftlab distill`` prints and stores in the
corrections file's ``source``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import numpy as np
import pandas as pd

from graftlab.kinds import whole_name

# The opt-in outlier rule's usual factor (``flag_groups(outlier=OUTLIER)``; off by default): a ratio
# threshold cannot tell a large real correction from noise, see graftlab.distill.degenerate.
OUTLIER = 1000.0

FLAG_DEGENERATE = "degenerate"
FLAG_ZERO = "zero M step"
FLAG_EMPTY = "no finite ratio"

Values = Union[Mapping[str, float], pd.Series]

GRAD_COLUMN = "norm_g"

# float32 machine epsilon: a group gradient this small against the model's is below its resolution.
NOISE_SHARE = 2.0 ** -23

# A gradient-free-by-construction group of a run in a coarser dtype: eps(dtype) times this (see
# noise_share). bfloat16: 6.1e-5 against key-bias noise <= 1.9e-6; float16: 7.6e-6 against <= 3.9e-6.
COARSE_NOISE_FACTOR = 2.0 ** -7

# eps of the dtypes a trace's ``precision`` may name (no torch import: distill does not need torch)
_EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}

# A gradient-free key bias sits 200-850x above its weight's median; real biases 0.1-2x.
SIBLING_FACTOR = 30.0

BASIS_GRADIENT = "gradient"
BASIS_STRUCTURE = "structure"
BASIS_OUTLIER = "outlier"

_KEY_BIAS = ("attention key bias: softmax gives every key the same shift q.b, so the loss does not "
             "depend on it (true gradient zero)")


@dataclass(frozen=True)
class Evidence:
    """What is known about one group's D step, and the verdict drawn from it.

    ``grad_share``: median over the window of ``norm_g / ||g_model||`` (None without ``norm_g``).
    ``structure``: why the group is gradient-free by construction, or None.
    ``sibling`` / ``sibling_factor``: the weight of the same projection and ``median / its median``.
    ``outlier_factor``: ``median / median over groups`` (only with the opt-in outlier rule).
    ``basis``: which evidence decided (``gradient``, ``structure``, ``outlier``), None when kept.
    """

    group: str
    degenerate: bool
    basis: Optional[str] = None
    grad_share: Optional[float] = None
    structure: Optional[str] = None
    sibling: Optional[str] = None
    sibling_factor: Optional[float] = None
    outlier_factor: Optional[float] = None
    noise_share: float = NOISE_SHARE  # the bound grad_share was held against (noise_share())
    precision: Optional[str] = None  # the dtype of the run's gradients, when the trace says

    def reason(self) -> str:
        """One line for people: why the group is (or is not) flagged."""
        if self.basis == BASIS_GRADIENT:
            return (f"gradient is float noise: {self.grad_share:.2g} of the model's gradient norm "
                    f"(below {self._bound()})")
        if self.basis == BASIS_STRUCTURE:
            return (f"attention key bias (gradient-free: softmax ignores a shift shared by all keys) "
                    f"whose median is {self.sibling_factor:.3g}x that of {self.sibling}; no norm_g column")
        if self.basis == BASIS_OUTLIER:
            return f"median is {self.outlier_factor:.3g}x the median over groups (outlier rule)"
        if self.grad_share is not None:
            return f"gradient {self.grad_share:.2g} of the model's: a real gradient"
        return ""

    def _bound(self) -> str:
        if self.noise_share == NOISE_SHARE:
            return f"float32 resolution {NOISE_SHARE:.2g}"
        return f"{self.noise_share:.2g}, the noise bound of a gradient-free group in a {self.precision} run"

    def short(self) -> str:
        """A few words for a table cell."""
        if self.basis == BASIS_GRADIENT:
            return f"|g| {self.grad_share:.1g} of model"
        if self.basis == BASIS_STRUCTURE:
            return f"key bias, {self.sibling_factor:.3g}x its weight"
        if self.basis == BASIS_OUTLIER:
            return f"{self.outlier_factor:.3g}x median"
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "degenerate": self.degenerate,
            "basis": self.basis,
            "reason": self.reason(),
            "short": self.short(),
            "grad_share": _finite(self.grad_share),
            "structure": self.structure,
            "sibling": self.sibling,
            "sibling_factor": _finite(self.sibling_factor),
            "outlier_factor": _finite(self.outlier_factor),
            "noise_share": self.noise_share,
            "precision": self.precision,
        }


def _finite(v: Optional[float]) -> Optional[float]:
    return float(v) if v is not None and math.isfinite(v) else None


def gradient_free(name: str, kind: Optional[str]) -> Optional[str]:
    """Why group ``name`` of ``kind`` has a zero true gradient by construction, else None.

    Only the attention key bias qualifies (kind ``K`` from :mod:`graftlab.kinds`, tensor ``bias``);
    fused QKV biases carry Q's and V's real gradients and are not included.

    >>> gradient_free("bert.encoder.layer.0.attention.self.key.bias", "K") is not None
    True
    """
    if kind == "K" and whole_name(name).rsplit(".", 1)[-1] == "bias":  # per head too: "key.bias[head 3]"
        return _KEY_BIAS
    return None


def sibling(name: str, groups) -> Optional[str]:
    """``prefix.weight`` for a group ``prefix.bias`` when that group exists in ``groups``."""
    head, _, leaf = name.rpartition(".")
    if leaf != "bias" or not head:
        return None
    other = f"{head}.weight"
    return other if other in groups else None


def noise_share(precision: Optional[str] = None, structure: Optional[str] = None) -> float:
    """The bound below which a group's gradient share (:func:`gradient_shares`) is float noise.

    ``precision``: the trace metadata's dtype of the run's gradients (None, unknown names and
    float32 or finer: :data:`NOISE_SHARE`, float32's epsilon); ``structure``: why the group is
    gradient-free by construction (:func:`gradient_free`), or None. Only such a group gets the
    coarser dtype's bound, ``eps(precision) * COARSE_NOISE_FACTOR``: its noise grows with the
    dtype's rounding, while a small real gradient (a Q bias) does not shrink (module doc, rule 1).
    """
    eps = _EPS.get(str(precision).removeprefix("torch.")) if precision is not None else None
    if structure is None or eps is None or eps <= NOISE_SHARE:
        return NOISE_SHARE
    return max(NOISE_SHARE, eps * COARSE_NOISE_FACTOR)


def gradient_shares(df: pd.DataFrame) -> Optional[pd.Series]:
    """Per group, the median over steps of ``norm_g / ||g_model||``; None without a ``norm_g`` column.

    ``df`` is the long trace (``step``, ``group``, ``norm_g``) of the steps to judge. Rows whose
    ``norm_g`` is not finite (steps where it was not recorded) are skipped; ``||g_model||`` is the
    root sum of squares of the finite ``norm_g`` of each step. Groups without a usable row get NaN.
    """
    if GRAD_COLUMN not in df.columns or df.empty:
        return None
    g = df[GRAD_COLUMN].to_numpy(dtype=np.float64)
    ok = np.isfinite(g) & (g >= 0)
    if not ok.any():
        return None
    step = df["step"].to_numpy()[ok]
    g = g[ok]
    group = df["group"].to_numpy()[ok]
    codes, uniq = pd.factorize(step)
    total = np.sqrt(np.bincount(codes, weights=g * g, minlength=len(uniq)))[codes]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, g / total, np.nan)
    med = pd.Series(share).groupby(pd.Series(group, dtype=object).astype(str).to_numpy(), sort=False).median()
    order = [str(x) for x in pd.unique(df["group"])]
    return med.reindex(order)


class Assessment(Mapping[str, Evidence]):
    """:func:`assess`'s verdicts for every group, held as columns (10^5 to 10^6 groups at a time);
    ``assessment[group]`` builds that group's :class:`Evidence`.

    ``frame``: one row per group (index: group names) with the columns ``degenerate`` (bool), ``basis``,
    ``grad_share``, ``structure``, ``sibling``, ``sibling_factor``, ``outlier_factor``, ``noise_share``
    (NaN or None where a value does not apply); ``precision`` as given to :func:`assess`.
    """

    def __init__(self, frame: pd.DataFrame, precision: Optional[str] = None):
        self.frame = frame
        self.precision = precision
        self._row = {g: i for i, g in enumerate(frame.index)}

    def __getitem__(self, group: str) -> Evidence:
        i = self._row[group]
        f = self.frame
        col = {c: f[c].iat[i] for c in ("basis", "grad_share", "structure", "sibling", "sibling_factor",
                                        "outlier_factor", "noise_share")}
        return Evidence(group, bool(f["degenerate"].iat[i]), col["basis"], _finite(col["grad_share"]),
                        col["structure"], col["sibling"], _finite(col["sibling_factor"]),
                        _finite(col["outlier_factor"]), float(col["noise_share"]), self.precision)

    def __iter__(self):
        return iter(self.frame.index)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def degenerate(self) -> list[str]:
        """The groups judged degenerate, in order."""
        return self.frame.index[self.frame["degenerate"].to_numpy()].tolist()


def assess(
    medians: pd.Series,
    kinds: Mapping[str, str],
    *,
    shares: Optional[pd.Series] = None,
    outlier: Optional[float] = None,
    precision: Optional[str] = None,
) -> Assessment:
    """The evidence and verdict for every group of ``medians`` (see the module doc for the rules).

    ``medians``: median ratio per group (NaN where none); ``kinds``: group -> kind (``graftlab.kinds``);
    ``shares``: :func:`gradient_shares` of the same steps, or None; ``outlier``: the opt-in rule's
    factor (None or 0: off); ``precision``: the dtype of the run's gradients (trace metadata
    ``precision``; None: float32), which sets :func:`noise_share`. Groups without a finite positive
    median are never called degenerate here (they are flagged for that by :func:`flag_groups`).
    Returns an :class:`Assessment`, a mapping of group -> :class:`Evidence`.
    """
    med = pd.Series(medians, dtype=np.float64)
    index = pd.Index([str(g) for g in med.index], dtype=object)
    m = med.to_numpy()
    n = len(m)
    finite = np.isfinite(m)
    usable = finite & (m > 0)
    ref = float(np.median(m[usable])) if outlier and usable.sum() >= 3 else None
    kind = pd.Series(kinds if isinstance(kinds, pd.Series) else dict(kinds), dtype=object)
    kind.index = kind.index.map(str)
    kind = kind[~kind.index.duplicated()].reindex(index).to_numpy()
    share = (np.full(n, np.nan) if shares is None else
             pd.Series(shares.to_numpy(np.float64), index=shares.index.map(str)).reindex(index).to_numpy())
    # only attention key biases are gradient-free by construction: the per-name test runs on kind K alone
    structure = np.full(n, None, dtype=object)
    for i in np.flatnonzero(kind == "K"):
        structure[i] = gradient_free(index[i], "K")
    # a bias's sibling is the weight of the same projection, when the trace holds it
    names = pd.Series(index, dtype=object)
    biases = np.flatnonzero(names.str.endswith(".bias").to_numpy(bool)
                            & (names.str.len() > len(".bias")).to_numpy(bool))
    at = (index.get_indexer(names.iloc[biases].str.slice(0, -len("bias")) + "weight") if len(biases)
          else np.zeros(0, dtype=np.intp))
    sibling = np.full(n, None, dtype=object)
    sibling_factor = np.full(n, np.nan)
    has, at = biases[at >= 0], at[at >= 0]
    sibling[has] = index[at].to_numpy()
    ok = np.isfinite(m[at]) & (m[at] > 0) & finite[has]
    with np.errstate(divide="ignore", invalid="ignore"):
        sibling_factor[has[ok]] = m[has[ok]] / m[at[ok]]
        outlier_factor = m / ref if ref else np.full(n, np.nan)
    is_structural = np.array([s is not None for s in structure], dtype=bool)
    bound = np.where(is_structural, noise_share(precision, _KEY_BIAS), noise_share(precision))
    has_share = np.isfinite(share)
    basis = np.full(n, None, dtype=object)
    basis[usable & has_share & (share < bound)] = BASIS_GRADIENT
    basis[usable & ~has_share & is_structural & (sibling_factor >= SIBLING_FACTOR)] = BASIS_STRUCTURE
    if ref:
        basis[usable & (basis == None) & (outlier_factor > outlier)] = BASIS_OUTLIER  # noqa: E711
    text = {"basis": basis, "structure": structure, "sibling": sibling}  # None where absent, never NaN
    frame = pd.DataFrame({"degenerate": basis != None, "grad_share": share,  # noqa: E711
                          "sibling_factor": sibling_factor, "outlier_factor": outlier_factor, "noise_share": bound,
                          **{k: pd.Series(v, index=index, dtype=object) for k, v in text.items()}}, index=index)
    return Assessment(frame, precision)


def method(shares: Optional[pd.Series], outlier: Optional[float] = None,
           precision: Optional[str] = None) -> dict[str, Any]:
    """How degenerate groups were decided, for a corrections file's ``source``."""
    coarse = noise_share(precision, _KEY_BIAS)
    rule = f"median of norm_g / model gradient norm < {NOISE_SHARE:.3g}"
    if coarse != NOISE_SHARE:
        rule += f" ({coarse:.3g} for attention key biases: a {precision} run)"
    d: dict[str, Any] = (
        {"basis": BASIS_GRADIENT, "rule": rule, "precision": precision}
        if shares is not None else
        {"basis": BASIS_STRUCTURE,
         "rule": f"attention key bias with a median >= {SIBLING_FACTOR:g}x its weight's (the trace has no norm_g)"}
    )
    d["outlier"] = float(outlier) if outlier else None
    return d


def flag_window(
    rows: pd.DataFrame,
    medians: pd.Series,
    kinds: Mapping[str, str],
    outlier: Optional[float] = None,
    precision: Optional[str] = None,
) -> tuple[pd.Series, Assessment, dict[str, Any]]:
    """Flags (:func:`flag_groups`), evidence per group and the method, for the
    window whose trace rows are ``rows`` and whose per-group medians are ``medians``;
    ``precision`` is the trace metadata's (None: float32)."""
    shares = gradient_shares(rows)
    evidence = assess(medians, kinds, shares=shares, outlier=outlier, precision=precision)
    flags = flag_groups(medians, degenerate=evidence.degenerate)
    return flags, evidence, method(shares, outlier, precision)


def flag_groups(medians: Values, outlier: Optional[float] = None, *, degenerate=()) -> pd.Series:
    """Flag groups whose median cannot serve as a correction; ``""`` where fine.

    - ``"no finite ratio"``: D never moved the group inside the window.
    - ``"zero M step"``: median 0 (M never moves it; a factor of 0 would freeze it under D).
    - ``"degenerate"``: the groups in ``degenerate``, which :func:`graftlab.distill.degenerate.assess`
      decides from what D's step is made of (gradient share, structure), with its evidence.
    - ``outlier`` (opt-in, None or 0: off): also ``"degenerate"`` where the median exceeds ``outlier``
      times the median over all groups' medians (needs at least 3 groups). A ratio threshold cannot
      tell a large real correction (Q/K weights: Table 5's 470-1090) from noise, hence off by default.
    """
    med = pd.Series(medians, dtype=np.float64)
    flags = pd.Series("", index=med.index, dtype=object)
    good = np.isfinite(med) & (med > 0)
    flags[good & med.index.isin(list(degenerate))] = FLAG_DEGENERATE
    flags[~np.isfinite(med)] = FLAG_EMPTY
    flags[np.isfinite(med) & (med <= 0)] = FLAG_ZERO
    good = med[good]
    if outlier and len(good) >= 3:
        ref = float(np.median(good.to_numpy()))
        flags[good.index[good > outlier * ref]] = FLAG_DEGENERATE
    return flags


def fallback_factors(medians: Values, kinds: Values, flags: Values) -> pd.Series:
    """Stand-in medians for flagged groups: the median over unflagged groups of the same kind,
    or 1.0 (D's recorded learning rate unchanged) when the kind has none. Unflagged groups keep
    their own median."""
    med = pd.Series(medians, dtype=np.float64)
    kind = pd.Series(kinds).reindex(med.index)
    flag = pd.Series(flags).reindex(med.index).fillna("")
    ok = (flag == "").to_numpy()
    values = med.to_numpy()
    out = med.copy()
    if ok.all():
        return out
    peers = ok & np.isfinite(values) & (values > 0)
    per_kind = pd.Series(values[peers]).groupby(kind.to_numpy()[peers]).median()
    stand_in = kind[~ok].map(per_kind).fillna(1.0).to_numpy(np.float64)
    out[~ok] = stand_in
    return out
