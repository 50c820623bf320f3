"""``graftlab demo``: record -> distill -> train on the bundled BERT task, with a results table and figures."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def demo(
    quick: bool = typer.Option(False, "--quick", help="A sub-minute version (40 steps, batch 8)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps of each run [default: 300; quick: 40]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size [default: 16; quick: 8]."),
    window: Optional[int] = typer.Option(None, "--window", help="Distill window [default: first half of the run]."),
    round: Optional[str] = typer.Option(None, "--round", help="Rounding, as `graftlab distill --round`: none, pow10, D<beta>, DA<beta> (only attention Q, K, V tied), or Dauto (D<beta> with beta the median ratio of the groups inside transformer blocks of this run) [default: none]."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum in D and the SGD runs [default: 0]."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto (a GPU when there is one)."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for PyTorch; 1 ran the quick demo 5x faster than 2 on a loaded 2-core machine, 0 takes PyTorch's own count."),
    seed: int = typer.Option(0, "--seed", help="Seed for init, data order and masking."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="New folder to write [default: runs/demo-<timestamp>]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Record Adam#SGD on bert, distill per-layer corrections, train SGD with and without them and Adam."""
    from graftlab.demo import DemoConfig, format_gap, format_table, run_demo

    given = {k: v for k, v in dict(steps=steps, batch_size=batch_size, window=window, round=round,
                                   momentum=momentum).items() if v is not None}
    common = dict(device=device, threads=threads or None, seed=seed, out=str(out) if out is not None else None)
    cfg = DemoConfig.quick(**given, **common) if quick else DemoConfig(**given, **common)
    res = run_demo(cfg, progress=not quiet, echo=typer.echo)
    typer.echo("")
    typer.echo(format_table(res.table))
    typer.echo("")
    typer.echo(format_gap(res.table))
    typer.echo(f"\nwindow {res.window}, round {res.round}; {res.wall_time:.0f} s; everything is in {res.folder}")
