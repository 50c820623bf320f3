"""Transformer experiment (the paper's Table 6b at small scale): can SGD with distilled corrections
train a transformer LM (``bert`` masked LM or ``gpt`` causal LM) as well as tuned Adam?

    python experiments/transformer.py                    # bert/small on the CPU, 3 seeds (~1 h on 2 busy cores)
    python experiments/transformer.py --task gpt         # the same on the causal LM
    python experiments/transformer.py --quick            # a few steps, one seed: checks the script
    graftlab experiment transformer --preset gpu         # gpt/base on one GPU, an estimated 2-3 min (PRESETS)

Runs (held-out loss and accuracy, every run's metrics in ``runs/*.parquet``):

1. Tuned baselines: Adam and SGD (momentum 0.9) over log lr grids of 5 points a factor sqrt(10)
   apart (seed 0), each extended by one point at a time until the best lr (lowest held-out loss)
   is interior (:func:`experiments.runner.tune`).
2. Adam#SGD layer-wise (live grafting, M = tuned Adam, D = tuned SGD), recorded to a trace.
3. From the seed-0 trace, plain SGD (D's lr, momentum 0.9) with
   - ``median``: per-layer medians of the first quarter of training (the paper's static correction),
   - ``dbeta``: the paper's D_beta rounding (every transformer-block group tied to beta = the median
     of the block groups' medians; the rest rounded down to powers of ten in {0.1, 1, 10, 100}),
   - ``dbeta_attn``: D_beta with only the attention weight matrices tied (``--round DA<beta>``, beta =
     the median of their medians); LayerNorms, biases and FFN layers rounded to powers of ten,
   - ``dbeta_qk``: D_beta with only the Q and K weight matrices tied (``--tie``), the groups whose
     ratios sit far above the rest on these models; everything else rounded to powers of ten,
   - ``global``: one factor, the median over the first quarter of the whole-model ratio,
   - ``schedule``: per-layer piecewise-constant schedules (windowed medians over the whole grafted
     run); the run's own schedule is then constant, because the windows carry M's warmup and decay.
4. Seeds 1..N-1 repeat the comparison (tuned Adam, tuned SGD, live graft, the five corrections,
   distilled once from seed 0 as a user would). Every method is reported as mean ± std over seeds
   and as per-seed paired differences to tuned Adam and tuned SGD with a 95% t interval; a share of
   the Adam-SGD gap is quoted only when that gap is outside noise.

Outputs in the out dir: ``results.md`` (tables), ``grids.csv``, ``comparison.csv``, ``transformer.png``,
``drift.csv``, ``runs.csv``, ``settings.json``.
"""
from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd

from experiments.runner import Experiment, Job, RecordConfig, Settings, TrainConfig, lr_tag, markdown, quarter_medians
from experiments.stats import compare, gap_closed, half_decade, tune
from graftlab.distill.analysis import ATTENTION_KINDS
from graftlab.errors import GraftlabError

NAME = "transformer"
TASKS = ("bert", "gpt")
METHODS = ["adam", "sgd", "graft", "median", "dbeta", "dbeta_attn", "dbeta_qk", "global", "schedule"]
CORRECTIONS = ["median", "dbeta", "dbeta_attn", "dbeta_qk", "global", "schedule"]
DBETAS = ["dbeta", "dbeta_attn", "dbeta_qk"]
LABELS = {
    "adam": "Adam (tuned)",
    "sgd": "SGD+momentum (tuned)",
    "graft": "Adam#SGD layer-wise (live)",
    "median": "SGD + first-quarter medians",
    "dbeta": "SGD + D_beta (paper: blocks tied)",
    "dbeta_attn": "SGD + D_beta (attention weights tied)",
    "dbeta_qk": "SGD + D_beta (Q/K weights tied)",
    "global": "SGD + one global factor",
    "schedule": "SGD + per-layer schedule",
}
# Initial lr grids as half-decade exponents k (lr = 10 ** (k / 2)), centred on each task's best
# value in earlier measurements; tune() extends them until the best is interior.
GRIDS = {
    "bert": {"adam": range(-8, -3), "sgd": range(-4, 1)},  # Adam 1e-4..1e-2, SGD 0.01..1
    "gpt": {"adam": range(-7, -2), "sgd": range(-3, 2)},  # Adam 3.16e-4..3.16e-2, SGD 0.0316..3.16
}

# Named defaults. "gpu" is the whole experiment on one GPU in a few minutes: gpt/base (6 x 512, seq
# 128, 27M parameters, bf16 autocast, data on the device), batch 32, 1000 steps (4.1M tokens, 4.6
# epochs of the KJV's 0.89M training tokens: more epochs over this corpus overfit), 10 runs at once
# sharing the GPU. docs/results.md gives the time estimate and how it was made.
#
# "cpu256" is the regime where tuned Adam beats tuned SGD by more than a nat on a 2-core CPU: gpt/tiny at
# batch 256 (docs/results.md), 300 steps (about 2 min a run on one thread), two runs at a time, with
# the per-layer schedule also applied to some groups only (ABLATIONS). "cpu16" and "cpu64" are the
# same at batch 16 and 64 for the gap-against-batch-size curve (equal steps; experiments/gap_curve.py),
# with the per-layer schedule as the only correction.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {"task": "gpt", "size": "base", "batch_size": 32, "steps": 1000, "seeds": 3, "eval_size": 512,
            "device": "cuda", "jobs": 10},
    **{f"cpu{b}": {"task": "gpt", "size": "tiny", "batch_size": b, "steps": 300, "seeds": 3, "eval_size": 128,
                   "device": "cpu", "jobs": 2, "threads": 1} for b in (16, 64, 256)},
}
# What a preset changes besides the command-line settings: initial grids (half-decade exponents,
# still extended until the best is interior), which corrections run, and the ablations.
PLANS: dict[str, dict[str, Any]] = {
    # Adam 1e-3..3.16e-2, SGD 0.0316..1; the ablations on seed 0 only (what fitted the CPU budget)
    "cpu256": {"adam_ks": range(-6, -2), "sgd_ks": range(-3, 1), "ablations": True, "ablation_seeds": 1},
    "cpu64": {"adam_ks": range(-6, -3), "sgd_ks": range(-3, 0), "corrections": ["schedule"]},
    "cpu16": {"adam_ks": range(-7, -4), "sgd_ks": range(-3, 0), "corrections": ["schedule"]},
}
# The per-layer schedule applied to some groups only (by kind); every other group follows plain SGD's
# own lr schedule (warmup and decay, step by step), so the run differs from tuned SGD only there.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "schedule_out_emb": ("output", "embedding"),
    "schedule_qk": ("Q", "K"),
    "schedule_no_out": ("-output",),  # every kind but the output layer
}
ABLATION_LABELS = {
    "schedule_out_emb": "SGD + schedule on output layer and embeddings only",
    "schedule_qk": "SGD + schedule on Q and K only",
    "schedule_no_out": "SGD + schedule on all but the output layer",
}
ALL_LABELS = {**LABELS, **ABLATION_LABELS}


def resolve(s: Settings) -> Settings:
    """``s`` with its preset's values filled in where the user gave none (a preset never overrides
    an explicit option)."""
    if s.preset is None:
        return s
    if s.preset not in PRESETS:
        raise GraftlabError(f"unknown preset {s.preset!r}: choose one of {', '.join(PRESETS)}")
    import dataclasses

    values = {k: v if getattr(s, k) is None else getattr(s, k) for k, v in PRESETS[s.preset].items()}
    return dataclasses.replace(s, **values)


def defaults(s: Settings) -> dict[str, Any]:
    task = s.task or "bert"
    if task not in TASKS:
        raise GraftlabError(f"unknown task {task!r} for the transformer experiment: choose one of {', '.join(TASKS)}")
    full_steps = {"bert": 150, "gpt": 120}[task]  # sized for ~1 hour on 2 heavily shared cores (docs/results.md)
    steps = s.pick("steps", full_steps, 8)
    plan = PLANS.get(s.preset or "", {})
    grids = {"adam": plan.get("adam_ks", GRIDS[task]["adam"]), "sgd": plan.get("sgd_ks", GRIDS[task]["sgd"])}
    if s.quick and s.preset is None:  # one point per grid: checks the pipeline, tunes nothing
        grids = {k: [list(v)[2]] for k, v in grids.items()}
    return {
        "task": task,
        "preset": s.preset,
        "size": s.pick("size", "small", "tiny"),
        "batch_size": s.pick("batch_size", {"bert": 16, "gpt": 8}[task], 8),
        "steps": steps,
        "seeds": s.pick("seeds", 3, 1),
        "eval_size": s.pick("eval_size", 128, 16),
        "eval_every": max(steps // 3, 1),
        "adam_ks": list(grids["adam"]),
        "sgd_ks": list(grids["sgd"]),
        "momentum": 0.9,
        "window": max(steps // 4, 1),  # first quarter: the static medians
        "schedule_window": max(steps // 8, 1),  # eight pieces over the run
        "device": s.device or "auto",
        "data": s.data,
        "jobs": s.jobs or 1,
        "corrections": list(plan.get("corrections", CORRECTIONS)),
        "ablations": list(ABLATIONS) if plan.get("ablations") else [],
        "ablation_seeds": min(int(plan.get("ablation_seeds", 3)), s.pick("seeds", 3, 1)),
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


def one_digit(m: float) -> float:
    p = 10 ** math.floor(math.log10(m))
    return float(f"{round(m / p) * p:.3g}")


def weight_groups(corr, kinds: Sequence[str]) -> list[str]:
    """Block groups of ``kinds`` whose tensor is a weight (not a bias), from a distill summary."""
    return [n for n, g in corr.source["groups"].items()
            if g.get("tied") and g.get("kind") in kinds and n.rsplit(".", 1)[-1].endswith("weight")]


def block_beta(corr, kinds: Optional[Sequence[str]] = None) -> float:
    """D_beta's beta chosen from the trace: the median of the unflagged tied groups' medians (all
    block groups, or only the weight matrices of ``kinds``), to one significant digit."""
    groups = corr.source["groups"]
    chosen = None if kinds is None else set(weight_groups(corr, kinds))

    def tied(name: str, g: dict) -> bool:
        return bool(g.get("tied")) and (chosen is None or name in chosen)

    meds = [g["median"] for n, g in groups.items() if tied(n, g) and not g.get("flags") and g.get("median")]
    if not meds:
        meds = [g["median"] for g in groups.values() if not g.get("flags") and g.get("median")]
    return one_digit(float(np.median(meds)))


def subset_schedule(schedule, trace: Path, kinds: Sequence[str], steps: int):
    """The per-layer ``schedule`` corrections kept on the groups of ``kinds`` only (``"-K"``: every
    kind but K); every other group gets plain SGD's own lr schedule, one piece per step (the recorded
    M lr over its peak: the task's warmup and decay), since the run itself has a constant lr."""
    from graftlab.corrections import Corrections
    from graftlab.trace import read_metadata, read_trace

    peak = float(read_metadata(trace)["config"]["magnitude_lr"])
    lr = read_trace(trace, columns=["step", "lr"]).groupby("step")["lr"].first().sort_index()
    plain = [[int(t), float(v) / peak] for t, v in lr.items() if t < steps]
    exclude = {k[1:] for k in kinds if k.startswith("-")}
    include = {k for k in kinds if not k.startswith("-")}

    def corrected(group: str) -> bool:
        kind = schedule.kind(group)
        return kind not in exclude if exclude else kind in include

    kept = [g for g in schedule.schedule if corrected(g)]
    if not kept:
        raise GraftlabError(f"no group of kind {', '.join(kinds)} in the schedule")
    sched = {g: (pieces if corrected(g) else plain) for g, pieces in schedule.schedule.items()}
    source = {**schedule.source, "subset": list(kinds), "corrected_groups": kept,
              "other_groups": "plain SGD lr schedule (recorded lr / peak, per step)"}
    return Corrections(multipliers={}, schedule=sched, source=source)


def main(argv: Optional[Sequence[str]] = None, settings: Optional[Settings] = None) -> Path:
    s = resolve(settings or Settings.from_argv(NAME, __doc__.splitlines()[0], argv))
    from graftlab.distill.pipeline import distill

    p = defaults(s)
    from graftlab.tasks import resolve_device

    resolve_device(p["device"])  # "--preset gpu" without a GPU: one error line before any worker starts
    name = NAME + ("" if p["task"] == "bert" else f"-{p['task']}") + (f"-{s.preset}" if s.preset else "")
    ex = Experiment.open(name, s)
    try:
        return _run(ex, p, distill)
    finally:
        ex.close()


def _run(ex: Experiment, p: dict, distill) -> Path:
    t0 = time.time()
    common = dict(task=p["task"], size=p["size"], batch_size=p["batch_size"], steps=p["steps"], device=p["device"],
                  eval_every=p["eval_every"], eval_size=p["eval_size"], data=p["data"])
    mom = {"momentum": p["momentum"]}

    def adam(lr: float, seed: int = 0) -> Job:
        return Job(f"adam_lr{lr_tag(lr)}_s{seed}", TrainConfig(optimizer="adam", lr=lr, seed=seed, **common))

    def sgd(lr: float, seed: int = 0) -> Job:
        return Job(f"sgd_lr{lr_tag(lr)}_s{seed}", TrainConfig(optimizer="sgd", lr=lr, hparams=mom, seed=seed, **common))

    # 1. grids on seed 0 (both initial grids at once, then each extended until its best is interior)
    ex.batch([adam(half_decade(k)) for k in p["adam_ks"]] + [sgd(half_decade(k)) for k in p["sgd_ks"]])
    loss = lambda r: r.final.get("loss", math.inf)  # noqa: E731
    adam_lr, adam_grid = tune(ex, p["adam_ks"], adam, loss)
    sgd_lr, sgd_grid = tune(ex, p["sgd_ks"], sgd, loss)
    ex.say(f"tuned: adam lr {adam_lr:g}, sgd lr {sgd_lr:g}")
    grids = pd.concat([adam_grid.assign(optimizer="Adam"), sgd_grid.assign(optimizer="SGD+momentum")])
    ex.write("grids.csv", grids.to_csv(index=False))

    def graft(seed: int) -> Job:
        cfg = RecordConfig(magnitude="adam", direction="sgd", magnitude_lr=adam_lr, direction_lr=sgd_lr,
                           d_hparams=mom, granularity="layer", seed=seed, **common)
        return Job(f"graft_s{seed}", cfg, "record")

    # 2. the traces and the other seeds' baselines, 3. corrections distilled once from seed 0
    seeds = range(p["seeds"])
    others = [j for sd in seeds[1:] for j in (adam(adam_lr, sd), sgd(sgd_lr, sd), graft(sd))]
    # the seed-0 trace beside as many other-seed runs as keep the workers busy; the rest go into the
    # corrected runs' batch, so no worker waits for the slowest run of a phase
    busy = max(p["jobs"] - 1, 0)
    ex.batch([graft(0)] + others[:busy])
    trace = ex.runs["graft_s0"].trace
    ex.corrections("median", lambda: distill(trace, window=p["window"], round="none"))
    beta = block_beta(ex.load("median"))
    beta_attn = block_beta(ex.load("median"), ATTENTION_KINDS)
    beta_qk = block_beta(ex.load("median"), ("Q", "K"))
    qk_tie = "^(" + "|".join(re.escape(g) for g in weight_groups(ex.load("median"), ("Q", "K"))) + ")$"
    ex.corrections("dbeta", lambda: distill(trace, window=p["window"], round=f"D{beta:g}"))
    ex.corrections("dbeta_attn", lambda: distill(trace, window=p["window"], round=f"DA{beta_attn:g}"))
    ex.corrections("dbeta_qk", lambda: distill(trace, window=p["window"], round=f"D{beta_qk:g}", tie=qk_tie))
    ex.corrections("global", lambda: global_factor(trace, p["window"], sgd_lr))
    ex.corrections("schedule", lambda: distill(trace, window=p["schedule_window"], schedule=True, round="none"))
    for a in p["ablations"]:
        ex.corrections(a, lambda: subset_schedule(ex.load("schedule"), trace, ABLATIONS[a], p["steps"]))
    ex.say(f"D_beta: beta = {beta:g} (blocks), {beta_attn:g} (attention weights), {beta_qk:g} (Q/K weights)")

    def corrected(method: str, seed: int) -> Job:
        extra = {"schedule": "constant", "warmup": 0.0} if method.startswith("schedule") else {}
        cfg = TrainConfig(optimizer="sgd", lr=sgd_lr, hparams=mom, seed=seed, **{**common, **extra})
        return Job(f"sgd_{method}_s{seed}", cfg, "train", ex.out / "corrections" / f"{method}.json")

    # in the order of what matters most when the budget runs out: the schedule and the first-window
    # medians on every seed, then every correction on seed 0, the ablations, the other seeds
    n_abl = p["ablation_seeds"]
    first = [m for m in ("schedule", "median") if m in p["corrections"]]
    rest = [m for m in p["corrections"] if m not in first]
    order = [(m, sd) for m in first for sd in seeds] + [(m, 0) for m in rest]
    order += [(m, sd) for m in p["ablations"] for sd in seeds[:n_abl]] + [(m, sd) for m in rest for sd in seeds[1:]]
    ex.batch(others[busy:] + [corrected(m, sd) for m, sd in order])
    names = {
        "adam": [adam(adam_lr, sd).name for sd in seeds], "sgd": [sgd(sgd_lr, sd).name for sd in seeds],
        "graft": [graft(sd).name for sd in seeds], **{m: [corrected(m, sd).name for sd in seeds] for m in p["corrections"]},
    }
    abl_names = {m: names[m][:n_abl] for m in ("adam", "sgd", "schedule") if m in names}
    abl_names.update({m: [corrected(m, sd).name for sd in seeds[:n_abl]] for m in p["ablations"]})
    elapsed = time.time() - t0
    betas = {"dbeta": beta, "dbeta_attn": beta_attn, "dbeta_qk": beta_qk}
    body = report(ex, p, names, adam_lr, sgd_lr, betas, trace, grids, elapsed, abl_names)
    used = {**p, "adam_lr": adam_lr, "sgd_lr": sgd_lr, "betas": betas, "invocation_wall_s": elapsed}
    if ex.missing:
        used["missing_runs"] = list(ex.missing)
    path = ex.finish(body, used)
    ex.say(f"results: {path}")
    return path


def gap_over_training(ex: Experiment, names: dict[str, list[str]]) -> pd.DataFrame:
    """Mean held-out loss per method at every evaluation step (seeds averaged)."""
    curves = {}
    for m in names:
        series = [ex.runs[n].evals("loss") for n in names[m] if n in ex.runs]
        if not series:
            continue
        curves[ALL_LABELS[m]] = pd.concat(series, axis=1).mean(axis=1)
    out = pd.DataFrame(curves)
    out.index = out.index.astype(int)
    return out.rename_axis("step")


def figure(ex: Experiment, curves: pd.DataFrame, task: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for col in curves:
        a.plot(curves.index, curves[col], marker="o", ms=3, label=col)
        b.plot(curves.index, curves[col] - curves[LABELS["adam"]], marker="o", ms=3, label=col)
    a.set(xlabel="step", ylabel="held-out loss", title=f"{task}: held-out loss (mean over seeds)")
    b.set(xlabel="step", ylabel="loss - Adam's loss", title="gap to Adam during training")
    b.axhline(0, color="k", lw=0.5)
    a.legend(fontsize=7)
    return ex.save_figure(fig, f"{NAME}.png")


def ablation_lines(ex: Experiment, p: dict, abl_names: dict[str, list[str]]) -> list[str]:
    """The ablations' section of results.md (and ``ablations.csv``): the seed-0 schedule applied to
    some groups only, compared with tuned Adam and SGD on the seeds the ablations ran."""
    if not p["ablations"]:
        return []
    n = p["ablation_seeds"]
    table, stats = compare(ex, abl_names, ALL_LABELS, refs=["adam", "sgd"])
    table["gap closed"] = ["-" if m in ("adam", "sgd") else gap_closed(stats, m, "adam", "sgd") for m in abl_names]
    if n < 2:  # one seed: no interval, so no share is called significant; give the one-seed share of the gap
        gap = stats["sgd"]["adam"]["mean"]
        table["gap closed"] = ["-" if m in ("adam", "sgd") else f"{100 * -stats[m]['sgd']['mean'] / gap:.0f}% (1 seed)"
                               for m in abl_names]
    table.loc[table["held-out loss"] == "not run", "gap closed"] = "not run"
    ex.write("ablations.csv", table.to_csv(index=False))
    lines = ["## Where the gap lives: the per-layer schedule on some groups only", "",
             f"The seed-0 per-layer schedule applied to the groups listed here only, on seed{'s' if n > 1 else ''} "
             f"{', '.join(str(i) for i in range(n))}; every other group follows plain SGD's own lr schedule (the "
             "task's warmup and decay, one piece per step), so each run differs from tuned SGD only on those groups. "
             + ("With one seed there is no interval: read the differences against the seed-to-seed spread of the "
                "comparison above." if n < 2 else ""), "",
             markdown(table), ""]
    for a in p["ablations"]:
        groups = ex.load(a).source.get("corrected_groups") or []
        lines.append(f"- {ABLATION_LABELS[a]}: {len(groups)} groups ({', '.join(groups)})")
    return lines + [""]


def dbeta_table(ex: Experiment) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per kind: the median first-quarter ratio and the factors each D_beta rule gives (median over
    the kind's unflagged groups), plus each rule's tied spread and warnings."""
    summary = ex.load("median").summary()
    ok = summary[~summary["flags"].astype(bool)].copy()
    for m in DBETAS:
        ok[m] = ok["group"].map(ex.load(m).multipliers)
    ok["tensor"] = ["weight" if str(g).rsplit(".", 1)[-1].endswith("weight") else "bias" for g in ok["group"]]
    table = ok.groupby(["kind", "tensor"])[["median", *DBETAS]].median()
    info = {m: {"spread": ex.load(m).source.get("tied_spread"), "warnings": ex.load(m).source.get("warnings") or [],
                "round": ex.load(m).source.get("round")} for m in DBETAS}
    names = {"median": "first-quarter median", "dbeta": "D_beta (blocks tied)",
             "dbeta_attn": "D_beta (attention weights tied)", "dbeta_qk": "D_beta (Q/K weights tied)"}
    return table.rename(columns=names), info


def report(ex: Experiment, p: dict, names: dict, adam_lr: float, sgd_lr: float, betas: dict[str, float],
           trace: Path, grids: pd.DataFrame, elapsed: float, abl_names: Optional[dict] = None) -> str:
    from graftlab.trace import group_table, read_metadata, read_trace

    table, stats = compare(ex, names, ALL_LABELS, refs=["adam", "sgd"])
    table["gap closed"] = ["-" if m in ("adam", "sgd") else gap_closed(stats, m, "adam", "sgd") for m in names]
    table.loc[table["held-out loss"] == "not run", "gap closed"] = "not run"
    ex.write("comparison.csv", table.to_csv(index=False))
    curves = gap_over_training(ex, names)
    figure(ex, curves, p["task"])
    gap = stats["sgd"]["adam"]

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
    dtable, dinfo = dbeta_table(ex)

    per_seed = pd.DataFrame({ALL_LABELS[m]: stats["values"][m] for m in names}).T
    per_seed.columns = [f"seed {c}" for c in per_seed.columns]
    grid_cols = ["optimizer", "lr", "held-out loss", "held-out accuracy", "diverged", "chosen"]
    grid_view = grids[[c for c in grid_cols if c in grids.columns]]
    task_desc = {"bert": "masked-LM", "gpt": "next-token"}[p["task"]]

    def spread(m: str) -> str:
        v = dinfo[m]["spread"]
        return "-" if v is None else f"{v:.3g}x"

    lines = [
        f"# {NAME}: SGD with distilled corrections vs tuned Adam on {p['task']}/{p['size']}",
        "",
        f"{p['task']}/{p['size']}, batch {p['batch_size']}, {p['steps']} steps (linear warmup 10%, linear "
        f"decay), held-out {task_desc} loss and accuracy on {p['eval_size']} held-out sequences; seeds "
        f"0..{p['seeds'] - 1}; device {p['device']}, {p['jobs']} run(s) at a time. Tuned (seed 0): Adam lr "
        f"{adam_lr:g}, SGD (momentum {p['momentum']}) lr {sgd_lr:g}. Corrections from the seed-0 Adam#SGD "
        f"trace: first window {p['window']} steps, schedule windows {p['schedule_window']} steps, D_beta "
        f"beta = {betas['dbeta']:g} (all block groups tied), {betas['dbeta_attn']:g} (attention weights tied) "
        f"and {betas['dbeta_qk']:g} (Q/K weights tied), global factor "
        f"{ex.load('global').multipliers['global']:.4g}. This invocation took {elapsed / 60:.1f} min of wall time "
        "(runs finished earlier are read back, not rerun; the run list below has each run's time).",
        "",
        *([f"**Not run** (the experiment was stopped when its compute budget ran out, and these tables "
           f"written from the finished runs with `--finished-only`): {', '.join(ex.missing)}. Those methods are "
           "reported on the seeds they have ('seeds' column); paired differences use those seeds only.", ""]
          if ex.missing else []),
        "## lr grids (seed 0)",
        "",
        "Each grid starts with 5 points a factor sqrt(10) apart and is extended (at most 3 times) until "
        "the lowest held-out loss is interior; 'chosen (edge)' marks a best value still at an edge.",
        "",
        markdown(grid_view, floatfmt=".4g"),
        "",
        "## Comparison",
        "",
        f"Tuned Adam-SGD gap (paired, SGD - Adam): {gap['mean']:+.4f} ± {gap['std']:.4f} nats, 95% interval "
        f"±{gap['ci']:.4f} ({'outside' if gap['significant'] else 'within'} noise). Differences are per-seed "
        "paired (method - reference, held-out loss): mean ± std [95% t half-width], `*` where the "
        "interval excludes 0. 'gap closed' = (SGD - method) / (SGD - Adam) on the paired means, given only "
        "when the Adam-SGD gap is outside noise; '(n.s.)' where the method's own difference to SGD is not.",
        "",
        markdown(table),
        "",
        "Held-out loss per seed:",
        "",
        markdown(per_seed.reset_index(names="method"), floatfmt=".4f"),
        "",
        *ablation_lines(ex, p, abl_names or {}),
        "## Held-out loss during training (mean over seeds)",
        "",
        markdown(curves.reset_index(), floatfmt=".4f"),
        "",
        f"![held-out loss and gap]({NAME}.png)",
        "",
        "## D_beta: the paper's rule against attention-only tying",
        "",
        f"Tied medians span {spread('dbeta')} under the paper's rule (every block group tied to {betas['dbeta']:g}), "
        f"{spread('dbeta_attn')} with only the attention weight matrices tied (to {betas['dbeta_attn']:g}) and "
        f"{spread('dbeta_qk')} with only Q/K weights tied (to {betas['dbeta_qk']:g}); distill warns above 10x. "
        "Factors per kind and tensor (median over the unflagged groups):",
        "",
        markdown(dtable.reset_index(), floatfmt=".3g"),
        "",
        *[f"- distill warned: {w}" for m in DBETAS for w in dinfo[m]["warnings"]],
        "",
        "## Ratios by quarter of training (seed-0 trace, flagged groups left out)",
        "",
        "Per kind, the median over groups of each group's median ratio in each quarter; the '/ lr' "
        "columns divide every ratio by M's lr relative to its peak (drift not explained by the lr schedule).",
        "",
        markdown(drift.reset_index(), floatfmt=".3g"),
        "",
        "Flagged groups (stand-in factor: the median of their kind):",
        "",
        markdown(flagged, floatfmt=".3g") if len(flagged) else "none",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
