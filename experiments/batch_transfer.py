"""Batch-size transfer: do per-layer corrections recorded at batch B predict those at 4B, rescaled by
the square-root rule (lr proportional to sqrt(batch), so x2 for 4B)?

    python experiments/batch_transfer.py            # full: bert/small, B=16 and 64, 2 seeds (2 shared CPU cores: ~8 min)
    python experiments/batch_transfer.py --quick    # a few steps: checks the script
    graftlab experiment batch_transfer --batch-size 256 --steps 2000 --device cuda   # scaled up

The paper's Table 5 shows medians 10-100x apart between batch 8K and 32K and leaves the transfer open.
Here Adam#SGD (layer-wise, same learning rates and schedule) is recorded at B and 4B for each seed;
each group's median ratio over the first quarter of training is compared between the two. With
the learning rates fixed, the ratio ``||Adam step|| / ||SGD step||`` grows as the gradient shrinks:
when gradient noise dominates, ``||g|| ~ 1/sqrt(B)`` while Adam's step barely depends on ``||g||``, so
the square-root rule predicts ``median(4B) = 2 x median(B)``. The error of each prediction
(x1: no rescaling, x2: square root, x4: linear) is reported in log10 space over the unflagged
groups, per layer kind and overall, next to the fitted exponent ``log(median(4B)/median(B)) / log 4``
(0.5 under the square-root rule) and the seed-to-seed noise floor at batch B.

Outputs: ``results.md``, ``batch_transfer.png`` (4B medians against B medians, log-log),
``medians.csv`` (per group, seed and batch), ``runs.csv``, ``settings.json``.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd

from experiments.runner import Experiment, RecordConfig, Settings, markdown

NAME = "batch_transfer"
FACTOR = 4  # 4B against B
PREDICTIONS = {"x1 (no rescaling)": 1.0, "x2 (square root)": math.sqrt(FACTOR), "x4 (linear)": float(FACTOR)}


def defaults(s: Settings) -> dict[str, Any]:
    steps = s.pick("steps", 120, 8)
    return {
        "size": s.pick("size", "small", "tiny"),
        "batch_size": s.pick("batch_size", 16, 4),
        "steps": steps,
        "seeds": s.pick("seeds", 2, 1),
        "eval_size": s.pick("eval_size", 64, 16),
        "adam_lr": 1e-3,
        "sgd_lr": 0.1,
        "momentum": 0.9,
        "window": max(steps // 4, 1),
        "device": s.device or "auto",
    }


def medians(trace: Path, window: int) -> pd.DataFrame:
    """Per group: first-window median, kind, flag (from :func:`graftlab.distill.pipeline.distill`)."""
    from graftlab.distill.pipeline import distill

    info = distill(trace, window=window, round="none", drift=False).source["groups"]
    return pd.DataFrame({
        "group": list(info),
        "kind": [d["kind"] for d in info.values()],
        "median": [d["median"] if d["median"] is not None else math.nan for d in info.values()],
        "flag": [d["flags"] or "" for d in info.values()],
    })


def main(argv: Optional[Sequence[str]] = None, settings: Optional[Settings] = None) -> Path:
    s = settings or Settings.from_argv(NAME, __doc__.splitlines()[0], argv)

    p = defaults(s)
    ex = Experiment.open(NAME, s)
    batches = [p["batch_size"], FACTOR * p["batch_size"]]
    frames = []
    for seed in range(p["seeds"]):
        for b in batches:
            cfg = RecordConfig(task="bert", size=p["size"], batch_size=b, steps=p["steps"], device=p["device"],
                               magnitude="adam", direction="sgd", magnitude_lr=p["adam_lr"], direction_lr=p["sgd_lr"],
                               d_hparams={"momentum": p["momentum"]}, granularity="layer", seed=seed,
                               eval_every=0, eval_size=p["eval_size"])
            run = ex.record(f"bs{b}_s{seed}", cfg)
            frames.append(medians(run.trace, p["window"]).assign(batch=b, seed=seed))
    table = pd.concat(frames, ignore_index=True)
    ex.write("medians.csv", table.to_csv(index=False))
    body = report(ex, p, table, batches)
    path = ex.finish(body, p)
    ex.say(f"results: {path}")
    return path


def transfer_table(table: pd.DataFrame, batches: list[int]) -> pd.DataFrame:
    """Per (seed, group): log10 of median(4B) / median(B); groups flagged at either batch dropped."""
    small, large = batches
    wide = table.pivot_table(index=["seed", "group"], columns="batch", values="median", aggfunc="first")
    kinds = table.drop_duplicates("group").set_index("group")["kind"]
    flagged = set(table.loc[table["flag"] != "", "group"])
    wide = wide[~wide.index.get_level_values("group").isin(flagged)]
    out = pd.DataFrame({"log10_ratio": np.log10(wide[large] / wide[small])}).reset_index()
    out["kind"] = out["group"].map(kinds)
    return out[np.isfinite(out["log10_ratio"])]


def errors(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean |log10 error| of each prediction, and the fitted exponent, per kind and overall."""
    def row(part: pd.DataFrame) -> dict[str, float]:
        d = {"groups x seeds": len(part)}
        for label, k in PREDICTIONS.items():
            d[label] = float(np.mean(np.abs(part["log10_ratio"] - math.log10(k))))
        d["fitted exponent"] = float(np.median(part["log10_ratio"]) / math.log10(FACTOR))
        d["observed x (median)"] = float(10 ** np.median(part["log10_ratio"]))
        return d

    rows = {k: row(part) for k, part in frame.groupby("kind")}
    rows["all"] = row(frame)
    return pd.DataFrame(rows).T.rename_axis("kind")


def noise_floor(table: pd.DataFrame, batch: int) -> float:
    """Mean |log10| difference of the same group's median between seeds 0 and 1 at ``batch``."""
    part = table[(table["batch"] == batch) & (table["flag"] == "")]
    wide = part.pivot_table(index="group", columns="seed", values="median", aggfunc="first")
    if wide.shape[1] < 2:
        return math.nan
    diff = np.log10(wide.iloc[:, 0] / wide.iloc[:, 1])
    return float(np.mean(np.abs(diff[np.isfinite(diff)])))


# Q and K share a range (both 500-1000 here): distinct markers keep both visible where they overlap
_MARKERS = {"Q": "o", "K": "^", "V": "s", "attn_out": "D", "ffn": "o", "embedding": "P", "output": "X", "norm": "v"}


def transfer_figure(wide: pd.DataFrame, small: int, large: int, title: str):
    """Each group's median at ``large`` against ``small`` (log-log, one point per group and seed),
    in the layer-kind colours and style of graftlab's figures, with the three rescaling rules."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from graftlab.kinds import KIND_LABELS
    from graftlab.plots.common import LABEL_ORDER, kind_color, style

    with style():
        fig, ax = plt.subplots(figsize=(6.2, 5.6), layout="constrained")
        kinds = sorted(wide["kind"].unique(), key=lambda k: LABEL_ORDER.index(KIND_LABELS.get(k, KIND_LABELS["other"])))
        handles = []
        for kind in kinds:
            part = wide[wide["kind"] == kind]
            color = kind_color(kind) if kind in KIND_LABELS else "0.4"
            marker = _MARKERS.get(kind, "o")
            hollow = kind == "K"  # drawn over Q: an open marker lets Q's points show through
            ax.scatter(part[small], part[large], s=30, marker=marker, facecolors="none" if hollow else color,
                       edgecolors=color, linewidths=1.2, alpha=0.85, zorder=3)
            handles.append(Line2D([], [], ls="", marker=marker, markersize=6, color=color,
                                  markerfacecolor="none" if hollow else color,
                                  label=KIND_LABELS.get(kind, kind)))
        both = wide[[small, large]].to_numpy(dtype=float)
        lo, hi = np.nanmin(both), np.nanmax(both)
        xs = np.array([lo / 1.5, hi * 1.5])
        styles = {1.0: (":", "0.45"), 2.0: ("-", "0.1"), 4.0: ("--", "0.45")}
        for label, k in PREDICTIONS.items():
            ls, c = styles.get(k, ("-.", "0.6"))
            handles.append(ax.plot(xs, k * xs, ls=ls, color=c, lw=1.1, label=label, zorder=2)[0])
        ax.set(xscale="log", yscale="log", xlabel=f"median ratio at batch {small}",
               ylabel=f"median ratio at batch {large}")
        ax.set_title(f"{title}: first-quarter medians, batch {small} vs {large}", loc="center")
        ax.legend(handles=handles, fontsize="small", loc="upper left", ncol=1)
        qk = wide[wide["kind"].isin(["Q", "K"])]
        if len(qk):  # the Q and K points share one corner of the plot: a zoom on it tells them apart
            inset = ax.inset_axes([0.6, 0.06, 0.37, 0.34])
            for kind in ("Q", "K"):
                part = qk[qk["kind"] == kind]
                color = kind_color(kind)
                inset.scatter(part[small], part[large], s=22, marker=_MARKERS[kind], linewidths=1.1,
                              facecolors="none" if kind == "K" else color, edgecolors=color, alpha=0.85)
            pts = qk[[small, large]].to_numpy(dtype=float)
            (x0, y0), (x1, y1) = pts.min(axis=0) / 1.08, pts.max(axis=0) * 1.08
            inset.set(xscale="log", yscale="log", xlim=(x0, x1), ylim=(y0, y1))
            inset.tick_params(labelsize="x-small", which="both")
            inset.set_title("Q and K, zoomed", fontsize="x-small")
            ax.indicate_inset_zoom(inset, edgecolor="0.4")
    return fig


def report(ex: Experiment, p: dict, table: pd.DataFrame, batches: list[int]) -> str:
    import matplotlib

    matplotlib.use("Agg")

    small, large = batches
    frame = transfer_table(table, batches)
    err = errors(frame)
    flagged = table[table["flag"] != ""].drop_duplicates(["group", "batch"])[["group", "kind", "batch", "median", "flag"]]
    noise = noise_floor(table, small)

    wide = table[table["flag"] == ""].pivot_table(index=["seed", "group", "kind"], columns="batch", values="median",
                                                  aggfunc="first").reset_index()
    fig = transfer_figure(wide, small, large, f"bert/{p['size']}")
    ex.save_figure(fig, f"{NAME}.png")

    per_kind = table[table["flag"] == ""].groupby(["kind", "batch"])["median"].median().unstack("batch")
    per_kind["4B / B"] = per_kind[large] / per_kind[small]
    lines = [
        f"# {NAME}: per-layer corrections at batch {small} and {large}",
        "",
        f"bert/{p['size']}, Adam (lr {p['adam_lr']:g}) # SGD (lr {p['sgd_lr']:g}, momentum {p['momentum']}) layer-wise, "
        f"{p['steps']} steps at both batch sizes (same lrs and schedule), seeds 0..{p['seeds'] - 1}; medians over "
        f"the first {p['window']} steps. Groups flagged as degenerate at either batch size are left out.",
        "",
        "Median over groups of each group's median, per kind:",
        "",
        markdown(per_kind.reset_index(), floatfmt=".3g"),
        "",
        "Prediction error of median(4B) from median(B), mean |log10(observed / predicted)| (0.301 = a factor 2):",
        "",
        markdown(err.reset_index(), floatfmt=".3f"),
        "",
        f"Seed-to-seed noise floor at batch {small} (mean |log10| between seeds 0 and 1): "
        + ("n/a (one seed)" if not math.isfinite(noise) else f"{noise:.3f}"),
        "",
        f"![B vs 4B]({NAME}.png)",
        "",
        "Flagged groups:",
        "",
        markdown(flagged, floatfmt=".3g") if len(flagged) else "none",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
