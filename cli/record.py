"""``graftlab record``: train a built-in task with M#D and stream per-group ratios to a Parquet trace."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from graftlab.cli import options


def record(
    task: options.Task = None,
    magnitude: Optional[str] = typer.Option(None, "--magnitude", "-m", help="M, the step size: sgd, adam, adamw, adagrad, rmsprop (default: adam)."),
    direction: Optional[str] = typer.Option(None, "--direction", "-d", help="D, the direction: sgd, adam, adamw, adagrad, rmsprop (default: sgd)."),
    granularity: Optional[str] = typer.Option(None, "--granularity", "-g", help="layer (one group per tensor), global, coordinate, head (attention per head) or vocab (head, plus embedding and output rows) (default: layer)."),
    row_block: Optional[int] = typer.Option(None, "--row-block", help="With --granularity vocab: vocabulary rows per group (default: 1)."),
    steps: options.Steps = None,
    epochs: options.Epochs = None,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Trace directory to write (required, here or in --config)."),
    magnitude_lr: Optional[float] = typer.Option(None, "--magnitude-lr", "--lr", help="M's peak learning rate, the step size (default: the task's for M)."),
    direction_lr: Optional[float] = typer.Option(None, "--direction-lr", help="D's learning rate (default: the task's for D)."),
    m_hparam: Optional[List[str]] = typer.Option(None, "--m-hparam", help="M hyperparameter NAME=VALUE, repeatable, e.g. betas=0.9,0.98 (default: the task's for M)."),
    d_hparam: Optional[List[str]] = typer.Option(None, "--d-hparam", help="D hyperparameter NAME=VALUE, repeatable, e.g. momentum=0.9 (default: the task's for D)."),
    schedule: options.Schedule = None,
    warmup: options.Warmup = None,
    power: options.Power = None,
    milestones: options.Milestones = None,
    gamma: options.Gamma = None,
    size: options.Size = None,
    data: options.Data = None,
    batch_size: options.BatchSize = None,
    device: options.Device = None,
    fsdp: options.Fsdp = False,
    checkpoint_dir: options.CheckpointDir = None,
    checkpoint_every: options.CheckpointEvery = None,
    resume: options.Resume = False,
    on_divergence: options.OnDivergence = None,
    divergence_lr_factor: options.DivergenceLrFactor = None,
    max_restarts: options.MaxRestarts = None,
    seed: options.Seed = None,
    threads: options.Threads = None,
    every: Optional[int] = typer.Option(None, "--every", help="Record every k-th step (default: 1)."),
    flush_every: Optional[int] = typer.Option(None, "--flush-every", help="Recorded steps per part file; at most this many are lost if the run dies (default: 100)."),
    eval_every: options.EvalEvery = None,
    metrics: options.Metrics = None,
    config: options.Config = None,
    overwrite: options.RecordOverwrite = False,
    quiet: options.Quiet = False,
) -> None:
    """Record per-group grafting ratios ||M step|| / ||D step|| of a training run."""
    from graftlab.runs import RecordConfig, make_config
    from graftlab.distributed import is_main
    from graftlab.runs import record as run

    cfg = make_config(
        config, RecordConfig, task=task, size=size, data=options.path_str(data), steps=steps, epochs=epochs,
        batch_size=batch_size, magnitude=magnitude, direction=direction, magnitude_lr=magnitude_lr,
        direction_lr=direction_lr, m_hparams=m_hparam, d_hparams=d_hparam, granularity=granularity, row_block=row_block,
        schedule=schedule, warmup=warmup, power=power, milestones=milestones, gamma=gamma, device=device, seed=seed,
        threads=threads, eval_every=eval_every, metrics=options.path_str(metrics), out=options.path_str(out),
        every=every, flush_every=flush_every, parallel="fsdp" if fsdp else None,
        checkpoint_dir=options.path_str(checkpoint_dir), checkpoint_every=checkpoint_every, resume=resume or None,
        on_divergence=on_divergence, divergence_lr_factor=divergence_lr_factor, max_restarts=max_restarts,
    )
    cfg.validate(overwrite=overwrite, inputs=[("config file", config)])  # every option and path, before any work
    res = run(cfg, overwrite=overwrite, progress=not quiet)
    if is_main():  # under torchrun rank 0 reports
        _report(cfg, res)
    res.fit.raise_if_diverged()  # after the report and the trace: one line, exit code 3


def _report(cfg, res) -> None:
    """The run's one-line result, the per-kind table of median ratios, and where the trace is."""
    from rich.console import Console
    from rich.table import Table

    from graftlab.kinds import KIND_LABELS

    console = Console(markup=False)  # group names hold brackets: "key.bias[head 3]"
    final = ", ".join(f"{k} {v:.4f}" for k, v in res.fit.final.items())
    fit, first = res.fit, res.fit.resumed_at
    speed = (f"{fit.steps_per_second:.1f} steps/s" if not first else
             "nothing left to train" if fit.steps <= first else
             f"{fit.steps_per_second:.1f} steps/s of this process (steps {first}..{fit.steps - 1})")
    console.print(f"{cfg.magnitude}#{cfg.direction} on {cfg.task}: {fit.steps} steps, {res.groups} groups, "
                  f"{speed}; held-out {final}")
    if res.fit.restarts:
        console.print(f"restarted {len(res.fit.restarts)} time(s) after diverging (from steps "
                      f"{', '.join(str(r.from_step) for r in res.fit.restarts)}), lr x{res.fit.lr_scale:g} since; "
                      "the trace's `restart` column marks the steps run after each")
    table = Table(title="median ratio ||M step|| / ||D step|| per kind (median over groups of each group's median)")
    for col in ("kind", "groups", "median", "min", "max", "flagged"):
        table.add_column(col, justify="left" if col == "kind" else "right")

    def num(v: float) -> str:
        return "-" if v != v else f"{v:.4g}"

    for kind, row in res.summary.iterrows():
        table.add_row(f"{kind} ({KIND_LABELS.get(kind, kind)})", str(int(row["groups"])), num(row["median"]),
                      num(row["min"]), num(row["max"]), str(int(row["flagged"])) if row["flagged"] else "")
    console.print(table)
    flagged = res.summary.attrs.get("flagged") or {}
    if flagged:
        console.print("kept out of the summary: " + ", ".join(f"{g} ({why})" for g, why in flagged.items()))
    console.print(f"trace written to {res.trace} (read it with graftlab.read_trace, which adds ratio = norm_m / norm_d; "
                  f"`graftlab info {res.trace}`)")
