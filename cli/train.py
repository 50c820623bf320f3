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
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the run's results: result.json (held-out metrics, settings), model.pt (the trained state_dict) and metrics.parquet (unless --metrics) [default: none: the results are printed only].")] = None,
    config: options.Config = None,
    overwrite: options.Overwrite = False,
    quiet: options.Quiet = False,
) -> None:
    """Train a built-in task with a plain optimizer: the baseline, or with distilled corrections."""
    import dataclasses

    from graftlab.distributed import is_main
    from graftlab.errors import GraftlabError
    from graftlab.runs import make_config
    from graftlab.runs import train as run

    cfg = make_config(config, TrainConfig, **values)
    inputs = [("config file", config), ("corrections file", corrections)]
    if out is not None:
        from graftlab.runs import train_out

        if cfg.parallel == "fsdp":  # the whole model is on no one process
            raise GraftlabError("{out} saves the whole model from one process; with {parallel=fsdp} use "
                                "{checkpoint_dir}", param=("out", "parallel", "checkpoint_dir"))
        train_out.check_out(out, overwrite=overwrite, metrics=cfg.metrics, inputs=inputs)
        if cfg.metrics is None:
            cfg = dataclasses.replace(cfg, metrics=train_out.metrics_path(out))
    cfg.validate(overwrite=overwrite, inputs=inputs)  # every option and path, before any work
    result = run(cfg, corrections=corrections, allow_missing=allow_missing, overwrite=overwrite, progress=not quiet,
                 allow_other_optimizer=allow_other_optimizer)
    if is_main():  # under torchrun rank 0 reports
        if out is not None:
            train_out.write(out, result, cfg, corrections)
        _report(cfg, result, corrections)
        if out is not None:
            typer.echo(f"results: {out} (result.json, model.pt)")
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
    console = Console(markup=False)  # group names hold brackets: "key.bias[head 3]"
    console.print(table)
    if result.path:
        console.print(f"metrics: {result.path}")
