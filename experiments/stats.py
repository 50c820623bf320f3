"""lr grids that extend until the best value is interior, and per-seed paired statistics.

    lr, grid = tune(ex, range(-8, -3), lambda lr: Job(...), score=lambda run: run.final["loss"])
    table, stats = compare(ex, {"adam": [...], "sgd": [...], ...}, labels, refs=["adam", "sgd"])
    gap_closed(stats, "schedule", good="adam", bad="sgd")   # "63%", "63% (n.s.)" or "gap within noise"

Grid points are half decades, ``10 ** (k / 2)`` (a factor sqrt(10) apart). Paired differences are
method minus reference on the same seed; their 95% interval uses Student's t with n - 1 degrees of
freedom (scipy).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from experiments.runner import Experiment, Job, Run, mean_std, pm

__all__ = ["compare", "fmt_paired", "gap_closed", "half_decade", "paired", "t_quantile", "tune"]


# ------------------------------------------------------------------------------- lr grids

def half_decade(k: int) -> float:
    """The lr ``10 ** (k / 2)`` to three significant digits: ..., 0.1, 0.316, 1, 3.16, ...
    (neighbours are a factor sqrt(10) apart)."""
    return float(f"{10 ** (k / 2):.3g}")


def tune(
    ex: Experiment,
    ks: Sequence[int],
    job: Callable[[float], Job],
    score: Callable[[Run], float],
    max_extend: int = 3,
) -> tuple[float, pd.DataFrame]:
    """Run the grid ``half_decade(k) for k in ks`` (seed 0) and extend it by one point at a time on
    the side of the best value until that value is interior (at most ``max_extend`` extensions).

    ``job(lr)`` builds the run, ``score(run)`` is minimised (diverged runs score +inf). Returns the
    best lr and the grid as a table (lr, run, score, held-out metrics, chosen, interior).
    """
    ks = sorted(set(int(k) for k in ks))
    for attempt in range(max_extend + 1):
        runs = ex.batch([job(half_decade(k)) for k in ks])
        scores = [score(r) if not r.diverged else math.inf for r in runs]
        i = int(np.argmin(scores))
        if attempt == max_extend or len(ks) < 2 or not math.isfinite(scores[i]):
            break
        if i == 0:
            ks.insert(0, ks[0] - 1)
        elif i == len(ks) - 1:
            ks.append(ks[-1] + 1)
        else:
            break
    rows = []
    for j, (k, r, sc) in enumerate(zip(ks, runs, scores)):
        rows.append({"lr": half_decade(k), "run": r.name, "score": sc, **{f"held-out {m}": v for m, v in r.final.items()},
                     "diverged": "yes" if r.diverged else "",
                     "chosen": ("chosen" if 0 < i < len(ks) - 1 else "chosen (edge)") if j == i else ""})
    return half_decade(ks[i]), pd.DataFrame(rows)


# ------------------------------------------------------------------------------- statistics

def t_quantile(dof: int, q: float = 0.975) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, dof))


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Per-seed paired differences ``a_i - b_i``: mean, sample std, the half-width of the 95% t
    interval of the mean (NaN with fewer than two pairs) and whether that interval excludes 0."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return {"mean": math.nan, "std": math.nan, "ci": math.nan, "n": 0, "significant": False}
    mean = float(d.mean())
    if d.size < 2:
        return {"mean": mean, "std": math.nan, "ci": math.nan, "n": 1, "significant": False}
    std = float(d.std(ddof=1))
    ci = t_quantile(d.size - 1) * std / math.sqrt(d.size)
    return {"mean": mean, "std": std, "ci": ci, "n": int(d.size), "significant": bool(abs(mean) > ci)}


def fmt_paired(p: dict[str, float], fmt: str = "+.4f") -> str:
    """``+0.0123 ± 0.0040 [±0.0099]``: mean ± std of the per-seed differences [95% half-width]; a
    trailing ``*`` marks an interval that excludes 0."""
    if not math.isfinite(p["mean"]):
        return "-"
    if not math.isfinite(p["std"]):
        return format(p["mean"], fmt)
    return f"{format(p['mean'], fmt)} ± {p['std']:.4f} [±{p['ci']:.4f}]{' *' if p['significant'] else ''}"


def compare(
    ex: Experiment,
    names: dict[str, list[str]],
    labels: dict[str, str],
    refs: Sequence[str],
    metrics: Sequence[str] = ("loss", "accuracy"),
    key: str = "loss",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per method (``names[method][i]`` is its seed-``i`` run): final held-out ``metrics`` as
    mean ± std over seeds, and for each method in ``refs`` the per-seed paired difference of ``key``
    to it (:func:`fmt_paired`). Diverged runs are counted and left out of means and pairs; runs not in
    ``ex.runs`` (not done) are left out too, and ``seeds`` counts the runs done.

    Also returns the paired statistics ``stats[method][ref]`` and the per-seed values
    ``stats["values"][method]`` for the summary text.
    """
    def values(m: str, metric: str) -> list[float]:
        out = []
        for n in names[m]:
            r = ex.runs.get(n)
            if r is None:
                out.append(math.nan)
                continue
            v = r.final.get(metric, math.nan)
            out.append(v if not r.diverged and math.isfinite(v) else math.nan)
        return out

    stats: dict[str, Any] = {"values": {m: values(m, key) for m in names}}
    rows = []
    for m in names:
        done = [ex.runs[n] for n in names[m] if n in ex.runs]
        row: dict[str, Any] = {"method": labels[m], "seeds": len(done), "diverged": sum(r.diverged for r in done)}
        for metric in metrics:
            vals = [v for v in values(m, metric) if math.isfinite(v)]
            row[f"held-out {metric}"] = pm(*mean_std(vals)) if done else "not run"
        stats[m] = {}
        for ref in refs:
            p = paired(values(m, key), values(ref, key))
            stats[m][ref] = p
            row[f"{key} - {labels[ref].split(' (')[0]}"] = "-" if m == ref else fmt_paired(p)
        rows.append(row)
    return pd.DataFrame(rows), stats


def gap_closed(stats: dict[str, Any], method: str, good: str, bad: str) -> str:
    """Share of the ``bad``-to-``good`` gap that ``method`` closes, on paired per-seed differences,
    quoted only when the gap itself is outside noise (its 95% interval excludes 0) and ``bad`` is
    worse; otherwise says why no share is given. ``(n.s.)`` marks a share whose own difference to
    ``bad`` is within noise."""
    gap = stats[bad][good]  # bad - good per seed: > 0 when good is better
    if not gap["significant"] or gap["mean"] <= 0:
        return "gap within noise"
    own = stats[method][bad]
    closed = -own["mean"] / gap["mean"]
    return f"{100 * closed:.0f}%" + ("" if own["significant"] else " (n.s.)")
