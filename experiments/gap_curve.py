"""The tuned Adam-SGD gap against the batch size, and the share the per-layer schedule closes.

    python experiments/transformer.py --preset cpu16     # gpt/tiny, batch 16, 300 steps, 3 seeds
    python experiments/transformer.py --preset cpu64     # the same at batch 64
    python experiments/transformer.py --preset cpu256    # the main experiment (batch 256)
    python experiments/gap_curve.py                      # reads the three, writes the curve

Every point is a finished transformer experiment (``results.md``, ``settings.json``, ``runs.csv``):
tuned Adam and tuned SGD (momentum 0.9), each on its own seed-0 grid, the live Adam#SGD graft, and
SGD with the per-layer schedule distilled from the seed-0 trace, all at the same number of steps.
Per batch size: the paired gap (SGD - Adam, per seed), what the schedule and the live graft close
(SGD - method), and the share of the gap (given only when the gap's 95% interval excludes 0).

Outputs in ``--out`` (default docs/results/transformer-gpt-batch-curve): ``curve.csv``,
``results.md``, ``curve.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd

from experiments.runner import lr_tag, markdown, mean_std, pm
from experiments.stats import fmt_paired, paired

DEFAULT = [f"runs/experiments/transformer-gpt-cpu{b}" for b in (16, 64, 256)]


def point(folder: Path) -> dict:
    """One batch size: per-seed held-out losses of the four methods and their paired statistics."""
    info = json.loads((folder / "settings.json").read_text())
    runs = pd.read_csv(folder / "runs.csv").set_index("run")
    seeds = range(int(info["seeds"]))
    names = {"adam": f"adam_lr{lr_tag(info['adam_lr'])}", "sgd": f"sgd_lr{lr_tag(info['sgd_lr'])}",
             "graft": "graft", "schedule": "sgd_schedule"}

    def losses(m: str) -> list[float]:
        out = []
        for sd in seeds:
            row = runs.loc[f"{names[m]}_s{sd}"]
            ok = pd.isna(row.get("diverged_at")) and math.isfinite(float(row["eval_loss"]))
            out.append(float(row["eval_loss"]) if ok else math.nan)
        return out

    v = {m: losses(m) for m in names}
    gap = paired(v["sgd"], v["adam"])
    row = {"batch": int(info["batch_size"]), "steps": int(info["steps"]), "seeds": len(seeds),
           "tokens_per_run": None, "adam_lr": info["adam_lr"], "sgd_lr": info["sgd_lr"]}
    for m in names:
        row[f"{m} loss"] = pm(*mean_std([x for x in v[m] if math.isfinite(x)]))
    row["gap (SGD - Adam)"] = fmt_paired(gap)
    for m in ("schedule", "graft"):
        closed = paired(v["sgd"], v[m])  # > 0: the method is below SGD
        row[f"{m} closes (SGD - it)"] = fmt_paired(closed)
        share = closed["mean"] / gap["mean"] if gap["significant"] and gap["mean"] > 0 else math.nan
        row[f"{m} share"] = "gap within noise" if math.isnan(share) else (
            f"{100 * share:.0f}%" + ("" if closed["significant"] else " (n.s.)"))
    stats = {"gap": gap, "values": v}
    return {"row": row, "stats": stats, "info": info}


def main(argv: Optional[Sequence[str]] = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", default=DEFAULT, help="finished transformer experiments, one per batch size")
    ap.add_argument("--out", default="docs/results/transformer-gpt-batch-curve")
    args = ap.parse_args(argv)
    from graftlab.tasks.gpt import SIZES

    points = sorted((point(Path(f)) for f in args.folders), key=lambda p: p["row"]["batch"])
    for p in points:
        p["row"]["tokens_per_run"] = p["row"]["batch"] * p["row"]["steps"] * SIZES[p["info"]["size"]].seq_len
    table = pd.DataFrame([p["row"] for p in points])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "curve.csv", index=False)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5, 3.5))
    b = [p["row"]["batch"] for p in points]
    for key, label in (("gap", "SGD - Adam (tuned)"),):
        ax.errorbar(b, [p["stats"]["gap"]["mean"] for p in points], yerr=[p["stats"]["gap"]["ci"] for p in points],
                    marker="o", capsize=3, label=label)
    sched = [paired(p["stats"]["values"]["schedule"], p["stats"]["values"]["adam"]) for p in points]
    ax.errorbar(b, [s["mean"] for s in sched], yerr=[s["ci"] for s in sched], marker="s", capsize=3,
                label="SGD + per-layer schedule - Adam")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xscale="log", xlabel="batch size (sequences of 32 tokens)", ylabel="held-out loss difference (nats)",
           title=f"gpt/tiny, {points[0]['row']['steps']} steps, mean and 95% interval")
    ax.set_xticks(b, [str(x) for x in b])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # log-axis minor labels would overlap the batches
    ax.legend(fontsize=7)
    fig.savefig(out / "curve.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    text = "\n".join([
        "# The tuned Adam-SGD gap against the batch size (gpt/tiny, equal steps)",
        "",
        "Each row is one transformer experiment (`python experiments/transformer.py --preset cpu<batch>`), "
        "read back by `python experiments/gap_curve.py`. Differences are per-seed paired held-out losses: "
        "mean ± std [95% t half-width], `*` where the interval excludes 0; a share of the gap is given only "
        "when the gap's interval excludes 0, '(n.s.)' where the method's own difference to SGD does not.",
        "",
        markdown(table, floatfmt=".4g"),
        "",
        "![gap against batch size](curve.png)",
        "",
        "Sources: " + ", ".join(f"`{f}`" for f in args.folders),
    ])
    (out / "results.md").write_text(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
