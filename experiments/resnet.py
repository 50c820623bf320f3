"""ResNet experiment (the paper's Table 2 and Figure 4 at small scale): does the learning-rate
schedule that SGD#AdaGrad discovers help AdaGrad on ``resnet``?

    python experiments/resnet.py             # full: resnet/tiny, 3 seeds (2 shared CPU cores: ~15 min)
    python experiments/resnet.py --quick     # a few steps, one seed: checks the script
    graftlab experiment resnet --size small --steps 4000 --device cuda   # scaled up

Runs (held-out top-1 on Fashion-MNIST, every run's metrics in ``runs/*.parquet``):

1. SGD with momentum 0.9 and AdaGrad, each over a 2-point lr grid with the task's step decay
   (x0.1 at 50% and 75%, 5% warmup), seed 0; the best lr (highest held-out top-1) is kept.
2. SGD#AdaGrad, global and layer-wise (M = tuned SGD with its schedule, D = tuned AdaGrad at a
   constant lr), recorded to traces.
3. AdaGrad with the schedule distilled from the seed-0 global trace (windowed medians of the ratio,
   piecewise constant): AdaGrad's lr times that schedule, no other schedule (the ratio already holds
   SGD's warmup and decay). The discovered schedule is drawn as the paper's Figure 4.
4. Seeds 1..N-1 repeat all five rows.

Outputs: ``results.md``, ``resnet.png`` (held-out top-1 during training), ``figure4.png``,
``runs.csv``, ``settings.json``.
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

from experiments.runner import Experiment, Settings, lr_tag, markdown, mean_std, pm

NAME = "resnet"
METHODS = ["sgd", "adagrad", "graft_global", "graft_layer", "adagrad_schedule"]
LABELS = {
    "sgd": "SGD+momentum (tuned, step decay)",
    "adagrad": "AdaGrad (tuned, step decay)",
    "graft_global": "SGD#AdaGrad global (live)",
    "graft_layer": "SGD#AdaGrad layer-wise (live)",
    "adagrad_schedule": "AdaGrad + discovered schedule",
}


def defaults(s: Settings) -> dict[str, Any]:
    steps = s.pick("steps", 160, 10)
    return {
        "size": s.pick("size", "tiny", "tiny"),
        "batch_size": s.pick("batch_size", 32, 16),
        "steps": steps,
        "seeds": s.pick("seeds", 3, 1),
        "eval_size": s.pick("eval_size", 1000, 64),
        "eval_every": max(steps // 4, 1),
        "sgd_lrs": [0.05] if s.quick else [0.05, 0.2],
        "adagrad_lrs": [0.05] if s.quick else [0.01, 0.05],
        "momentum": 0.9,
        "schedule_window": max(steps // 10, 1),
        "device": s.device,
    }


def best_by_accuracy(ex: Experiment, names: list[str]) -> str:
    def score(n: str) -> float:
        v = ex.runs[n].final.get("accuracy", math.nan)
        return v if math.isfinite(v) and not ex.runs[n].diverged else -math.inf

    return max(names, key=score)


def main(argv: Optional[Sequence[str]] = None, settings: Optional[Settings] = None) -> Path:
    s = settings or Settings.from_argv(NAME, __doc__.splitlines()[0], argv)
    from graftlab.distill import distill
    from graftlab.config import RecordConfig, TrainConfig

    p = defaults(s)
    ex = Experiment.open(NAME, s)
    common = dict(task="resnet", size=p["size"], batch_size=p["batch_size"], steps=p["steps"], device=p["device"],
                  eval_every=p["eval_every"], eval_size=p["eval_size"])
    mom = {"momentum": p["momentum"]}

    def sgd(lr: float, seed: int):
        return ex.train(f"sgd_lr{lr_tag(lr)}_s{seed}", TrainConfig(optimizer="sgd", lr=lr, hparams=mom, seed=seed, **common))

    def adagrad(lr: float, seed: int):
        return ex.train(f"adagrad_lr{lr_tag(lr)}_s{seed}", TrainConfig(optimizer="adagrad", lr=lr, seed=seed, **common))

    sgd_grid = {sgd(lr, 0).name: lr for lr in p["sgd_lrs"]}
    ada_grid = {adagrad(lr, 0).name: lr for lr in p["adagrad_lrs"]}
    sgd_lr = sgd_grid[best_by_accuracy(ex, list(sgd_grid))]
    ada_lr = ada_grid[best_by_accuracy(ex, list(ada_grid))]
    ex.say(f"tuned: sgd lr {sgd_lr:g}, adagrad lr {ada_lr:g}")

    def graft(granularity: str, seed: int):
        cfg = RecordConfig(magnitude="sgd", direction="adagrad", magnitude_lr=sgd_lr, direction_lr=ada_lr,
                           m_hparams=mom, granularity=granularity, seed=seed, **common)
        return ex.record(f"graft_{granularity}_s{seed}", cfg)

    trace = graft("global", 0).trace
    ex.corrections("schedule", lambda: distill(trace, window=p["schedule_window"], schedule=True, round="none"))

    def scheduled(seed: int):
        cfg = TrainConfig(optimizer="adagrad", lr=ada_lr, seed=seed, **{**common, "schedule": "constant", "warmup": 0.0})
        return ex.train(f"adagrad_schedule_s{seed}", cfg, corrections=ex.out / "corrections" / "schedule.json")

    names: dict[str, list[str]] = {m: [] for m in METHODS}
    for seed in range(p["seeds"]):
        names["sgd"].append(sgd(sgd_lr, seed).name)
        names["adagrad"].append(adagrad(ada_lr, seed).name)
        names["graft_global"].append(graft("global", seed).name)
        names["graft_layer"].append(graft("layer", seed).name)
        names["adagrad_schedule"].append(scheduled(seed).name)

    body = report(ex, p, names, sgd_lr, ada_lr, trace)
    path = ex.finish(body, {**p, "sgd_lr": sgd_lr, "adagrad_lr": ada_lr})
    ex.say(f"results: {path}")
    return path


def report(ex: Experiment, p: dict, names: dict, sgd_lr: float, ada_lr: float, trace: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graftlab import plots

    rows, curves = [], {}
    for m in METHODS:
        runs = [ex.runs[n] for n in names[m]]
        am, asd = mean_std([r.final.get("accuracy", math.nan) for r in runs if not r.diverged])
        lm, lsd = mean_std([r.final.get("loss", math.nan) for r in runs if not r.diverged])
        rows.append({"method": LABELS[m], "seeds": len(runs), "diverged": sum(r.diverged for r in runs),
                     "held-out top-1": pm(am, asd), "held-out loss": pm(lm, lsd)})
        curves[LABELS[m]] = pd.concat([r.evals("accuracy") for r in runs], axis=1).mean(axis=1)
    table = pd.DataFrame(rows)
    curves = pd.DataFrame(curves)
    curves.index = curves.index.astype(int)
    curves = curves.rename_axis("step")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for col in curves:
        ax.plot(curves.index, curves[col], marker="o", ms=3, label=col)
    ax.set(xlabel="step", ylabel="held-out top-1", title=f"resnet/{p['size']}: held-out top-1 (mean over seeds)")
    ax.legend(fontsize=7)
    ex.save_figure(fig, f"{NAME}.png")
    ex.save_figure(plots.figure4(str(trace)), "figure4.png")

    sched = ex.load("schedule").schedule["global"]
    pieces = pd.DataFrame(sched, columns=["start", "factor"])
    pieces["AdaGrad lr"] = pieces["factor"] * ada_lr
    lines = [
        f"# {NAME}: AdaGrad with the schedule discovered by SGD#AdaGrad on resnet/{p['size']}",
        "",
        f"resnet/{p['size']} (pre-activation ResNet-18, width 8) on Fashion-MNIST, batch {p['batch_size']}, "
        f"{p['steps']} steps, step decay x0.1 at 50% and 75% with 5% warmup; held-out top-1 on "
        f"{p['eval_size']} test images; seeds 0..{p['seeds'] - 1}. Grids (seed 0): SGD (momentum "
        f"{p['momentum']}) lr {p['sgd_lrs']} -> {sgd_lr:g}; AdaGrad lr {p['adagrad_lrs']} -> {ada_lr:g}. "
        f"Schedule: windowed medians ({p['schedule_window']} steps) of the seed-0 SGD#AdaGrad global trace.",
        "",
        markdown(table),
        "",
        "## Held-out top-1 during training (mean over seeds)",
        "",
        markdown(curves.reset_index(), floatfmt=".4f"),
        "",
        f"![held-out top-1]({NAME}.png)",
        "",
        "## The discovered schedule (Figure 4)",
        "",
        "Factor on AdaGrad's lr per piece (AdaGrad then runs at lr x factor, no other schedule):",
        "",
        markdown(pieces, floatfmt=".4g"),
        "",
        "![Figure 4](figure4.png)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
