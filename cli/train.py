"""``graftlab train``: plain training of a built-in task, optionally with a corrections file."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from graftlab.cli import options
from graftlab.runs.config import TrainConfig


@options.run_options(TrainConfig)
def train(
    values: dict,
    corrections: Annotated[Optional[Path], typer.Option("--corrections", help="Corrections file from `graftlab distill` (per-layer factors or an lr schedule) [default: none: plain training].")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Parameters without a correction keep factor 1 instead of being an error.")] = False,
    allow_other_optimizer: Annotated[bool, typer.Option("--allow-other-optimizer", help="Train --optimizer with corrections distilled for another D.")] = False,
    config: options.Config = None,
    overwrite: options.Overwrite = False,
    quiet: options.Quiet = False,
) -> None:
    """Train a built-in task with a plain optimizer: the baseline, or with distilled corrections."""
    from graftlab.distributed import is_main
    from graftlab.runs import make_config
    from graftlab.runs import train as run

    cfg = make_config(config, TrainConfig, **values)
    # every option and path, before any work
    cfg.validate(overwrite=overwrite, inputs=[("config file", config), ("corrections file", corrections)])
    result = run(cfg, corrections=corrections, allow_missing=allow_missing, overwrite=overwrite, progress=not quiet,
                 allow_other_optimizer=allow_other_optimizer)
    if is_main():  # under torchrun rank 0 reports
        _report(cfg, result, corrections)
    result.raise_if_diverged()  # after the report and the metrics file: one line, exit code 3


def _report(cfg, result, corrections) -> None:
    """The held-out metrics, final train loss, speed and where the metrics went."""
    from rich.console import Console
    from rich.table import Table

    name = cfg.optimizer or type(result.optimizer).__name__.lower()  # unset: D's, from the corrections
    table = Table(title=f"{cfg.task}/{cfg.size} {name}" + (f" + {corrections}" if corrections else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.final.items():
        table.add_row(f"held-out {key}", f"{value:.4f}")
    if len(result.metrics):  # a run resumed from its final checkpoint has no step left to report
        table.add_row("final train loss", f"{result.metrics['loss'].iloc[-1]:.4f}")
    table.add_row("steps", str(result.steps) + (f" (diverged at {result.diverged_at})" if result.diverged_at is not None else ""))
    if result.restarts:
        table.add_row("restarts", f"{len(result.restarts)} (from steps {', '.join(str(r.from_step) for r in result.restarts)}; "
                      f"lr x{result.lr_scale:g})")
    if result.resumed_at and result.steps <= result.resumed_at:
        table.add_row("resumed", f"the run was already complete at step {result.resumed_at}: nothing trained")
    elif result.resumed_at:  # the rates of this process's steps only, not of the whole run
        span = f"steps {result.resumed_at}..{result.steps - 1}"
        table.add_row("steps/s of this process", f"{result.steps_per_second:.1f} ({span})")
        table.add_row("wall time of this process", f"{result.wall_time:.1f} s")
    else:
        table.add_row("steps/s", f"{result.steps_per_second:.1f}")
        table.add_row("wall time", f"{result.wall_time:.1f} s")
    console = Console()
    console.print(table)
    if result.path:
        console.print(f"metrics: {result.path}")
