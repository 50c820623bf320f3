"""Transformer experiment (the paper's Table 6b at small scale): can SGD with distilled corrections
train the ``bert`` masked LM as well as Adam?

    python experiments/transformer.py            # full: bert/small, 3 seeds (2 shared CPU cores: ~30 min)
    python experiments/transformer.py --quick    # a few steps, one seed: checks the script
    graftlab experiment transformer --steps 3000 --size small --device cuda   # scaled up

Runs (held-out masked-LM loss and accuracy, every run's metrics in ``runs/*.parquet``):

1. Adam over an lr grid and SGD with momentum 0.9 over a grid of the same size (seed 0); the best
   lr of each (lowest held-out loss) is the baseline for the other seeds.
2. Adam#SGD layer-wise (live grafting, M = best Adam, D = best SGD), recorded to a trace.
3. From the seed-0 trace, plain SGD (D's lr, momentum 0.9) with
   - ``median``: per-layer medians of the first quarter of training (the paper's static correction),
   - ``dbeta``: D_beta rounding, beta = the median of the transformer-block groups' medians,
   - ``global``: one factor, the median over the first quarter of the whole-model ratio
     ``||sum of M steps|| / ||sum of D steps||`` computed from the layer norms,
   - ``schedule``: per-layer piecewise-constant schedules (windowed medians over the whole grafted
     run, ``graftlab distill --schedule``); the run's own schedule is then constant, because the
     windowed ratios already carry M's warmup and decay.
4. Seeds 1..N-1 repeat the final comparison (best Adam, best SGD, live graft, the four corrections,
   distilled once from seed 0 as a user would).

Outputs in the out dir: ``results.md`` (tables), ``transformer.png`` (held-out loss and gap to Adam
over training), ``drift.csv`` (per-kind ratios by quarter), ``runs.csv``, ``settings.json``.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd

from experiments.runner import Experiment, Settings, best, lr_tag, markdown, mean_std, pm, quarter_medians

NAME = "transformer"
METHODS = ["adam", "sgd", "graft", "median", "dbeta", "global", "schedule"]
LABELS = {
    "adam": "Adam (tuned)",
    "sgd": "SGD+momentum (tuned)",
    "graft": "Adam#SGD layer-wise (live)",
    "median": "SGD + first-quarter medians",
    "dbeta": "SGD + D_beta",
    "global": "SGD + one global factor",
    "schedule": "SGD + per-layer schedule",
}


def defaults(s: Settings) -> dict[str, Any]:
    steps = s.pick("steps", 300, 8)
    return {
        "size": s.pick("size", "small", "tiny"),
        "batch_size": s.pick("batch_size", 16, 8),
        "steps": steps,
        "seeds": s.pick("seeds", 3, 1),
        "eval_size": s.pick("eval_size", 128, 16),
        "eval_every": max(steps // 6, 1),
        "adam_lrs": [1e-3] if s.quick else [1e-3, 3e-3],
        "sgd_lrs": [0.1] if s.quick else [0.1, 0.3],
        "momentum": 0.9,
        "window": max(steps // 4, 1),  # first quarter: the static medians
        "schedule_window": max(steps // 8, 1),  # eight pieces over the run
        "device": s.device,
    }


def global_factor(trace: Path, window: int, direction_lr: float):
    """One factor for the whole model: median over ``[0, window)`` of the per-step ratio of the
    whole-model step norms, ``sqrt(sum norm_m^2) / sqrt(sum norm_d^2)`` over all layer groups."""
    from graftlab.corrections import Corrections
    from graftlab.trace import read_trace

    df = read_trace(trace, steps=(0, window), columns=["step", "group", "norm_m", "norm_d"])
    sq = df.assign(m2=df["norm_m"].astype(float) ** 2, d2=df["norm_d"].astype(float) ** 2)
    per_step = sq.groupby("step")[["m2", "d2"]].sum()
    ratio = np.sqrt(per_step["m2"]) / np.sqrt(per_step["d2"])
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    factor = float(np.median(ratio.to_numpy()))
    source = {"trace": str(trace.resolve()), "window": window, "mode": "global factor from layer norms",
              "direction_lr": direction_lr, "median": factor}
    return Corrections(multipliers={"global": factor}, source=source)


def block_beta(corr) -> float:
    """D_beta's beta chosen from the trace: the median of the unflagged block groups' medians,
    rounded to one significant digit."""
    groups = corr.source["groups"]
    meds = [g["median"] for g in groups.values() if g.get("tied") and not g.get("flags") and g.get("median")]
    if not meds:
        meds = [g["median"] for g in groups.values() if not g.get("flags") and g.get("median")]
    m = float(np.median(meds))
    p = 10 ** math.floor(math.log10(m))
    return float(f"{round(m / p) * p:.3g}")


def main(argv: Optional[Sequence[str]] = None, settings: Optional[Settings] = None) -> Path:
    s = settings or Settings.from_argv(NAME, __doc__.splitlines()[0], argv)
    from graftlab.distill import distill
    from graftlab.config import RecordConfig, TrainConfig

    p = defaults(s)
    ex = Experiment.open(NAME, s)
    common = dict(task="bert", size=p["size"], batch_size=p["batch_size"], steps=p["steps"], device=p["device"],
                  eval_every=p["eval_every"], eval_size=p["eval_size"])
    mom = {"momentum": p["momentum"]}

    def adam(lr: float, seed: int):
        return ex.train(f"adam_lr{lr_tag(lr)}_s{seed}", TrainConfig(optimizer="adam", lr=lr, seed=seed, **common))

    def sgd(lr: float, seed: int):
        return ex.train(f"sgd_lr{lr_tag(lr)}_s{seed}", TrainConfig(optimizer="sgd", lr=lr, hparams=mom, seed=seed, **common))

    # 1. grids on seed 0
    adam_runs = {adam(lr, 0).name: lr for lr in p["adam_lrs"]}
    sgd_runs = {sgd(lr, 0).name: lr for lr in p["sgd_lrs"]}
    adam_lr = adam_runs[best({k: ex.runs[k] for k in adam_runs})]
    sgd_lr = sgd_runs[best({k: ex.runs[k] for k in sgd_runs})]
    ex.say(f"tuned: adam lr {adam_lr:g}, sgd lr {sgd_lr:g}")

    def graft(seed: int):
        cfg = RecordConfig(magnitude="adam", direction="sgd", magnitude_lr=adam_lr, direction_lr=sgd_lr,
                           d_hparams=mom, granularity="layer", seed=seed, **common)
        return ex.record(f"graft_s{seed}", cfg)

    # 2. the trace, 3. corrections distilled once from it
    trace = graft(0).trace
    median = ex.corrections("median", lambda: distill(trace, window=p["window"], round="none"))
    beta = block_beta(ex.load("median"))
    ex.corrections("dbeta", lambda: distill(trace, window=p["window"], round=f"D{beta:g}"))
    ex.corrections("global", lambda: global_factor(trace, p["window"], sgd_lr))
    ex.corrections("schedule", lambda: distill(trace, window=p["schedule_window"], schedule=True, round="none"))
    ex.say(f"D_beta: beta = {beta:g}")

    def corrected(method: str, seed: int):
        extra = {"schedule": "constant", "warmup": 0.0} if method == "schedule" else {}
        cfg = TrainConfig(optimizer="sgd", lr=sgd_lr, hparams=mom, seed=seed, **{**common, **extra})
        return ex.train(f"sgd_{method}_s{seed}", cfg, corrections=ex.out / "corrections" / f"{method}.json")

    names: dict[str, list[str]] = {m: [] for m in METHODS}
    for seed in range(p["seeds"]):  # seed-major: an interrupted experiment has whole seeds
        names["adam"].append(adam(adam_lr, seed).name)
        names["sgd"].append(sgd(sgd_lr, seed).name)
        names["graft"].append(graft(seed).name)
        for method in ("median", "dbeta", "global", "schedule"):
            names[method].append(corrected(method, seed).name)

    body = report(ex, p, names, adam_lr, sgd_lr, beta, trace)
    path = ex.finish(body, {**p, "adam_lr": adam_lr, "sgd_lr": sgd_lr, "beta": beta})
    ex.say(f"results: {path}")
    return path


def comparison(ex: Experiment, names: dict[str, list[str]]) -> pd.DataFrame:
    """One row per method: held-out loss and accuracy over seeds, share of the Adam-SGD gap closed."""
    def finals(method: str, key: str) -> list[float]:
        return [ex.runs[n].final.get(key, math.nan) for n in names[method]]

    loss_adam = np.nanmean(finals("adam", "loss"))
    loss_sgd = np.nanmean(finals("sgd", "loss"))
    gap = loss_sgd - loss_adam
    rows = []
    for m in METHODS:
        losses = finals(m, "loss")
        ok = [v for v, n in zip(losses, names[m]) if math.isfinite(v) and not ex.runs[n].diverged]
        lm, ls = mean_std(ok)
        am, asd = mean_std([v for v, n in zip(finals(m, "accuracy"), names[m]) if not ex.runs[n].diverged])
        closed = (loss_sgd - lm) / gap if gap > 0 and len(ok) == len(losses) else math.nan
        rows.append({
            "method": LABELS[m], "seeds": len(losses), "diverged": len(losses) - len(ok),
            "held-out loss": pm(lm, ls), "held-out accuracy": pm(am, asd),
            "gap closed": "-" if m in ("adam", "sgd") or not math.isfinite(closed) else f"{100 * closed:.0f}%",
            "loss_mean": lm,
        })
    return pd.DataFrame(rows)


def gap_over_training(ex: Experiment, names: dict[str, list[str]]) -> pd.DataFrame:
    """Mean held-out loss per method at every evaluation step (seeds averaged)."""
    curves = {}
    for m in METHODS:
        series = [ex.runs[n].evals("loss") for n in names[m]]
        curves[LABELS[m]] = pd.concat(series, axis=1).mean(axis=1)
    out = pd.DataFrame(curves)
    out.index = out.index.astype(int)
    return out.rename_axis("step")


def figure(ex: Experiment, curves: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for col in curves:
        a.plot(curves.index, curves[col], marker="o", ms=3, label=col)
        b.plot(curves.index, curves[col] - curves[LABELS["adam"]], marker="o", ms=3, label=col)
    a.set(xlabel="step", ylabel="held-out MLM loss", title="bert: held-out loss (mean over seeds)")
    b.set(xlabel="step", ylabel="loss - Adam's loss", title="gap to Adam during training")
    b.axhline(0, color="k", lw=0.5)
    a.legend(fontsize=7)
    return ex.save_figure(fig, f"{NAME}.png")


def report(ex: Experiment, p: dict, names: dict, adam_lr: float, sgd_lr: float, beta: float, trace: Path) -> str:
    from graftlab.trace import group_table, read_metadata, read_trace

    table = comparison(ex, names)
    curves = gap_over_training(ex, names)
    figure(ex, curves)
    la, ls = table.loc[0, "loss_mean"], table.loc[1, "loss_mean"]

    med = ex.load("median")
    summary = med.summary()
    flagged = summary[summary["flags"].astype(bool)][["group", "kind", "median", "flags"]]
    kinds = group_table(read_metadata(trace))["kind"].to_dict()
    df = read_trace(trace, columns=["step", "group", "ratio", "lr"])
    keep = df[~df["group"].isin(set(flagged["group"]))]
    raw = quarter_medians(keep, p["steps"], kinds)
    norm = quarter_medians(keep, p["steps"], kinds, normalise_lr=True)
    drift = raw.join(norm.add_suffix(" / lr"))
    ex.write("drift.csv", drift.to_csv())
    sched = ex.load("schedule")
    pieces = {g: [f for _, f in v] for g, v in sched.schedule.items()}
    by_kind = pd.DataFrame({k: np.median([pieces[g] for g in pieces if kinds.get(g) == k and g not in set(flagged["group"])],
                                         axis=0) for k in sorted(set(kinds.values())) if any(kinds.get(g) == k for g in pieces)})
    by_kind.index = [s for s, _ in next(iter(sched.schedule.values()))]
    factors = summary.assign(dbeta=summary["group"].map(ex.load("dbeta").multipliers))
    kind_factors = factors[~factors["flags"].astype(bool)].groupby("kind")[["median", "dbeta"]].median()

    lines = [
        f"# {NAME}: SGD with distilled corrections vs Adam on bert/{p['size']}",
        "",
        f"bert/{p['size']}, batch {p['batch_size']}, {p['steps']} steps (poly decay, 10% warmup), "
        f"held-out MLM loss on {p['eval_size']} sequences; seeds 0..{p['seeds'] - 1}. "
        f"Grids (seed 0): Adam lr {p['adam_lrs']} -> {adam_lr:g}; SGD (momentum {p['momentum']}) lr "
        f"{p['sgd_lrs']} -> {sgd_lr:g}. Corrections distilled from the seed-0 Adam#SGD trace: first "
        f"window {p['window']} steps, schedule windows {p['schedule_window']} steps, D_beta beta = {beta:g}, "
        f"global factor {ex.load('global').multipliers['global']:.4g}.",
        "",
        f"Adam-SGD gap: {ls - la:.4f} nats (SGD {ls:.4f}, Adam {la:.4f}). 'gap closed' = "
        "(loss(SGD) - loss(method)) / (loss(SGD) - loss(Adam)), on the seed means.",
        "",
        markdown(table.drop(columns=["loss_mean"])),
        "",
        "## Held-out loss during training (mean over seeds)",
        "",
        markdown(curves.reset_index(), floatfmt=".4f"),
        "",
        f"![held-out loss and gap]({NAME}.png)",
        "",
        "## Ratios by quarter of training (seed-0 trace, flagged groups left out)",
        "",
        "Per kind, the median over groups of each group's median ratio in each quarter; the '/ lr' "
        "columns divide every ratio by M's lr relative to its peak (drift not explained by the lr schedule).",
        "",
        markdown(drift.reset_index(), floatfmt=".3g"),
        "",
        "## Distilled factors per kind (median over unflagged groups)",
        "",
        markdown(kind_factors.reset_index(), floatfmt=".3g"),
        "",
        "Per-layer schedule, median factor per kind at each piece start:",
        "",
        markdown(by_kind.rename_axis("start").reset_index(), floatfmt=".3g"),
        "",
        "Flagged groups (stand-in factor: the median of their kind):",
        "",
        markdown(flagged, floatfmt=".3g") if len(flagged) else "none",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
