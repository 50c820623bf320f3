"""``graftlab record``: train a built-in task with M#D and stream per-group ratios to a Parquet trace."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def record(
    task: Optional[str] = typer.Option(None, "--task", help="Built-in task: bert or resnet [default: bert]."),
    magnitude: Optional[str] = typer.Option(None, "--magnitude", "-m", help="M, the step size: sgd, adam, adamw, adagrad, rmsprop [default: adam]."),
    direction: Optional[str] = typer.Option(None, "--direction", "-d", help="D, the direction: sgd, adam, adamw, adagrad, rmsprop [default: sgd]."),
    granularity: Optional[str] = typer.Option(None, "--granularity", "-g", help="layer (one group per tensor), global or coordinate [default: layer]."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps [default: 300]."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the training data (instead of --steps)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Trace directory to write."),
    magnitude_lr: Optional[float] = typer.Option(None, "--magnitude-lr", "--lr", help="M's peak learning rate [default: the task's for M]."),
    direction_lr: Optional[float] = typer.Option(None, "--direction-lr", help="D's learning rate [default: the task's for D]."),
    m_hparam: Optional[List[str]] = typer.Option(None, "--m-hparam", help="M hyperparameter key=value (repeatable), e.g. betas=0.9,0.98."),
    d_hparam: Optional[List[str]] = typer.Option(None, "--d-hparam", help="D hyperparameter key=value (repeatable), e.g. momentum=0.9."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="M's lr schedule: constant, poly, step, cosine [default: the task's]."),
    warmup: Optional[float] = typer.Option(None, "--warmup", help="Warmup steps (>= 1) or fraction of the run (< 1)."),
    power: Optional[float] = typer.Option(None, "--power", help="poly decay power."),
    milestones: Optional[str] = typer.Option(None, "--milestones", help="step schedule: comma-separated fractions of the run."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="step schedule decay factor."),
    size: Optional[str] = typer.Option(None, "--size", help="Model size: tiny, small, base [default: tiny]."),
    data: Optional[str] = typer.Option(None, "--data", help="Your own data (text file/folder for bert; IDX folder or .npz for resnet)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Batch size [default: 32]."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or auto [default: auto]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for model, data order and masking [default: 0]."),
    every: Optional[int] = typer.Option(None, "--every", help="Record every k-th step [default: 1]."),
    flush_every: Optional[int] = typer.Option(None, "--flush-every", help="Recorded steps per part file (at most this many are lost if the run dies)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N steps (0: only at the end)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Also write per-step loss/lr/eval metrics to this Parquet file."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML or TOML file of these settings (options override it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing trace."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Record per-group grafting ratios ||M step|| / ||D step|| of a training run."""
    from rich.console import Console
    from rich.table import Table

    from graftlab.kinds import KIND_LABELS
    from graftlab.optimizers import parse_hparams
    from graftlab.record import RecordConfig, check_out
    from graftlab.record import record as run
    from graftlab.train import load_config, make_config

    base = load_config(config, RecordConfig) if config is not None else RecordConfig()
    m_hp = {**base.m_hparams, **parse_hparams(m_hparam)} if m_hparam else None
    d_hp = {**base.d_hparams, **parse_hparams(d_hparam)} if d_hparam else None
    cfg = make_config(
        config, RecordConfig, task=task, size=size, data=data, steps=steps, epochs=epochs, batch_size=batch_size,
        magnitude=magnitude, direction=direction, magnitude_lr=magnitude_lr, direction_lr=direction_lr,
        m_hparams=m_hp, d_hparams=d_hp, granularity=granularity, schedule=schedule, warmup=warmup, power=power,
        milestones=milestones, gamma=gamma, device=device, seed=seed, eval_every=eval_every, metrics=metrics,
        out=str(out) if out is not None else None, every=every, flush_every=flush_every,
    )
    check_out(cfg.out, overwrite)
    res = run(cfg, overwrite=overwrite, progress=not quiet)

    console = Console()
    final = ", ".join(f"{k} {v:.4f}" for k, v in res.fit.final.items())
    console.print(f"{cfg.magnitude}#{cfg.direction} on {cfg.task}: {res.fit.steps} steps, {res.groups} groups, "
                  f"{res.fit.steps_per_second:.1f} steps/s; held-out {final}")
    table = Table(title="median ratio ||M step|| / ||D step|| per kind (median over groups of each group's median)")
    for col in ("kind", "groups", "median", "min", "max"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for kind, row in res.summary.iterrows():
        table.add_row(f"{kind} ({KIND_LABELS.get(kind, kind)})", str(int(row["groups"])),
                      f"{row['median']:.4g}", f"{row['min']:.4g}", f"{row['max']:.4g}")
    console.print(table)
    console.print(f"trace written to {res.trace} (read it with graftlab.read_trace or pandas.read_parquet; "
                  f"`graftlab info {res.trace}`)")
