"""``graftlab demo``: record -> distill -> train on the bundled GPT task (batch 256), with a results table and figures."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from graftlab.runs.config import RunConfig
from graftlab.runs.fields import settings

THREADS_HELP = settings(RunConfig)["threads"].help  # one option, one help, in every command that trains


def demo(
    quick: bool = typer.Option(False, "--quick", help="A sub-minute version (40 steps, batch 8)."),
    task: Optional[str] = typer.Option(None, "--task", help="gpt (next-token) or bert (masked LM) [default: gpt]."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps of each run [default: 120; quick: 40]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size [default: 256; quick: 8]."),
    window: Optional[int] = typer.Option(None, "--window", help="Distill window [default: first half of the run]."),
    round: Optional[str] = typer.Option(None, "--round", help="Rounding, as `graftlab distill --round`: none, pow10, D<beta>, DA<beta> (only attention Q, K, V tied), or Dauto (D<beta> with beta the median ratio of the groups inside transformer blocks of this run) [default: none]."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum in D and the SGD runs [default: 0.9]."),
    magnitude_lr: Optional[float] = typer.Option(None, "--magnitude-lr", help="Adam's lr [default: 3.16e-3, tuned for gpt at batch 256]."),
    direction_lr: Optional[float] = typer.Option(None, "--direction-lr", help="SGD's lr [default: 0.1, tuned for gpt at batch 256]."),
    jobs: int = typer.Option(2, "--jobs", help="Runs at once, each in its own process; 1 runs them one after another."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto (a GPU when there is one)."),
    threads: int = typer.Option(1, "--threads", help=THREADS_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed for init, data order and masking."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="New folder to write [default: runs/demo-<timestamp>]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Record Adam#SGD on gpt, distill per-layer corrections, train SGD with and without them and Adam."""
    from graftlab.demo import DemoConfig, format_gap, format_table, run_demo

    given = {k: v for k, v in dict(task=task, steps=steps, batch_size=batch_size, window=window, round=round,
                                   momentum=momentum, magnitude_lr=magnitude_lr,
                                   direction_lr=direction_lr).items() if v is not None}
    common = dict(device=device, threads=threads, seed=seed, jobs=jobs,
                  out=str(out) if out is not None else None)
    cfg = DemoConfig.quick(**given, **common) if quick else DemoConfig(**given, **common)
    res = run_demo(cfg, progress=not quiet, echo=typer.echo)
    typer.echo("")
    typer.echo(format_table(res.table))
    typer.echo("")
    typer.echo(format_gap(res.table))
    typer.echo(f"\nwindow {res.window}, round {res.round}; {res.wall_time:.0f} s; everything is in {res.folder}")
