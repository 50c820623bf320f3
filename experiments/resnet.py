"""ResNet experiment (the paper's Table 2 and Figure 4 at small scale): does the learning-rate
schedule that SGD#AdaGrad discovers help AdaGrad on ``resnet``?

    python experiments/resnet.py             # full: resnet/tiny, 3 seeds (2 shared CPU cores: ~15 min)
    python experiments/resnet.py --quick     # a few steps, one seed: checks the script
    graftlab experiment resnet --size small --steps 4000 --device cuda   # scaled up

Runs (held-out top-1 on Fashion-MNIST, every run's metrics in ``runs/*.parquet``):

1. SGD with momentum 0.9 and AdaGrad, each over a log lr grid of 5 points a factor sqrt(10) apart
   with the task's step decay (x0.1 at 50% and 75%, 5% warmup), seed 0, extended until the best lr
   (highest held-out top-1) is interior.
2. SGD#AdaGrad, global and layer-wise (M = tuned SGD with its schedule, D = tuned AdaGrad at a
   constant lr), recorded to traces.
3. AdaGrad with the schedule distilled from the seed-0 global trace (windowed medians of the ratio,
   piecewise constant): AdaGrad's lr times that schedule, no other schedule (the ratio already holds
   SGD's warmup and decay). The discovered schedule is drawn as the paper's Figure 4.
4. Seeds 1..N-1 repeat all five rows; every row is reported as mean ± std over seeds and as per-seed
   paired differences to tuned SGD and tuned AdaGrad (95% t interval).

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

import pandas as pd

from experiments.runner import Experiment, Job, RecordConfig, Settings, TrainConfig, lr_tag, markdown
from experiments.stats import compare, half_decade, tune

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
        # half-decade exponents (lr = 10 ** (k / 2)): SGD 0.01..1, AdaGrad 0.001..0.1
        "sgd_ks": [-2] if s.quick else list(range(-4, 1)),
        "adagrad_ks": [-3] if s.quick else list(range(-6, -1)),
        "momentum": 0.9,
        "schedule_window": max(steps // 10, 1),
        "device": s.device or "auto",
    }


def main(argv: Optional[Sequence[str]] = None, settings: Optional[Settings] = None) -> Path:
    s = settings or Settings.from_argv(NAME, __doc__.splitlines()[0], argv)
    p = defaults(s)
    ex = Experiment.open(NAME, s)
    try:
        return _run(ex, p)
    finally:
        ex.close()


def _run(ex: Experiment, p: dict) -> Path:
    from graftlab.distill.pipeline import distill

    common = dict(task="resnet", size=p["size"], batch_size=p["batch_size"], steps=p["steps"], device=p["device"],
                  eval_every=p["eval_every"], eval_size=p["eval_size"])
    mom = {"momentum": p["momentum"]}

    def sgd(lr: float, seed: int = 0) -> Job:
        return Job(f"sgd_lr{lr_tag(lr)}_s{seed}", TrainConfig(optimizer="sgd", lr=lr, hparams=mom, seed=seed, **common))

    def adagrad(lr: float, seed: int = 0) -> Job:
        return Job(f"adagrad_lr{lr_tag(lr)}_s{seed}", TrainConfig(optimizer="adagrad", lr=lr, seed=seed, **common))

    ex.batch([sgd(half_decade(k)) for k in p["sgd_ks"]] + [adagrad(half_decade(k)) for k in p["adagrad_ks"]])
    top1 = lambda r: -r.final.get("accuracy", -math.inf)  # noqa: E731  (tune minimises)
    sgd_lr, sgd_grid = tune(ex, p["sgd_ks"], sgd, top1)
    ada_lr, ada_grid = tune(ex, p["adagrad_ks"], adagrad, top1)
    ex.say(f"tuned: sgd lr {sgd_lr:g}, adagrad lr {ada_lr:g}")
    grids = pd.concat([sgd_grid.assign(optimizer="SGD+momentum"), ada_grid.assign(optimizer="AdaGrad")])
    ex.write("grids.csv", grids.to_csv(index=False))

    def graft(granularity: str, seed: int) -> Job:
        cfg = RecordConfig(magnitude="sgd", direction="adagrad", magnitude_lr=sgd_lr, direction_lr=ada_lr,
                           m_hparams=mom, granularity=granularity, seed=seed, **common)
        return Job(f"graft_{granularity}_s{seed}", cfg, "record")

    seeds = range(p["seeds"])
    ex.batch([graft("global", 0)] + [j for sd in seeds for j in (
        *((sgd(sgd_lr, sd), adagrad(ada_lr, sd), graft("global", sd)) if sd else ()), graft("layer", sd))])
    trace = ex.runs["graft_global_s0"].trace
    ex.corrections("schedule", lambda: distill(trace, window=p["schedule_window"], schedule=True, round="none"))

    def scheduled(seed: int) -> Job:
        cfg = TrainConfig(optimizer="adagrad", lr=ada_lr, seed=seed, **{**common, "schedule": "constant", "warmup": 0.0})
        return Job(f"adagrad_schedule_s{seed}", cfg, "train", ex.out / "corrections" / "schedule.json")

    ex.batch([scheduled(sd) for sd in seeds])
    names = {"sgd": [sgd(sgd_lr, sd).name for sd in seeds], "adagrad": [adagrad(ada_lr, sd).name for sd in seeds],
             "graft_global": [graft("global", sd).name for sd in seeds],
             "graft_layer": [graft("layer", sd).name for sd in seeds],
             "adagrad_schedule": [scheduled(sd).name for sd in seeds]}
    body = report(ex, p, names, sgd_lr, ada_lr, trace, grids)
    path = ex.finish(body, {**p, "sgd_lr": sgd_lr, "adagrad_lr": ada_lr})
    ex.say(f"results: {path}")
    return path


def report(ex: Experiment, p: dict, names: dict, sgd_lr: float, ada_lr: float, trace: Path, grids: pd.DataFrame) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graftlab import plots

    table, stats = compare(ex, names, LABELS, refs=["sgd", "adagrad"], metrics=("accuracy", "loss"), key="accuracy")
    ex.write("comparison.csv", table.to_csv(index=False))
    curves = {LABELS[m]: pd.concat([ex.runs[n].evals("accuracy") for n in names[m]], axis=1).mean(axis=1)
              for m in METHODS}
    per_seed = pd.DataFrame({LABELS[m]: stats["values"][m] for m in METHODS}).T
    per_seed.columns = [f"seed {c}" for c in per_seed.columns]
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
        f"{p['eval_size']} test images; seeds 0..{p['seeds'] - 1}. Tuned (seed 0): SGD (momentum "
        f"{p['momentum']}) lr {sgd_lr:g}, AdaGrad lr {ada_lr:g}. Schedule: windowed medians "
        f"({p['schedule_window']} steps) of the seed-0 SGD#AdaGrad global trace.",
        "",
        "## lr grids (seed 0)",
        "",
        "5 points a factor sqrt(10) apart, extended (at most 3 times) until the highest held-out top-1 is "
        "interior; 'chosen (edge)' marks a best value still at an edge.",
        "",
        markdown(grids[["optimizer", "lr", "held-out accuracy", "held-out loss", "diverged", "chosen"]], floatfmt=".4g"),
        "",
        "## Comparison",
        "",
        "Differences are per-seed paired (method - reference, held-out top-1): mean ± std [95% t "
        "half-width], `*` where the interval excludes 0.",
        "",
        markdown(table),
        "",
        "Held-out top-1 per seed:",
        "",
        markdown(per_seed.reset_index(names="method"), floatfmt=".4f"),
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
