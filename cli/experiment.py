"""``graftlab experiment NAME``: run one of the experiments in ``experiments/`` (see docs/results.md)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from graftlab.errors import GraftlabError

EXPERIMENTS = ("transformer", "resnet", "batch_transfer")
ROOT = Path(__file__).resolve().parent.parent  # the experiments live beside cli/ in the source tree


def experiment(
    name: Annotated[str, typer.Argument(help="transformer, resnet or batch_transfer.")],
    quick: Annotated[bool, typer.Option("--quick", help="A few steps, one seed, tiny grids: checks that it runs.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory [default: runs/experiments/NAME].")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps per run [default: the experiment's].")] = None,
    size: Annotated[Optional[str], typer.Option("--size", help="Task size: tiny, small or base [default: the experiment's].")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per step (batch_transfer: the smaller B) [default: the experiment's].")] = None,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Seeds for the final comparison [default: the experiment's].")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or auto [default: auto, or the preset's].")] = None,
    eval_size: Annotated[Optional[int], typer.Option("--eval-size", help="Held-out examples per evaluation [default: the task's].")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads [default: 1].")] = None,
    progress: Annotated[bool, typer.Option("--progress", help="A progress bar per run.")] = False,
    task: Annotated[Optional[str], typer.Option("--task", help="transformer: bert or gpt [default: bert].")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="transformer: gpu (the whole experiment on one GPU in minutes), cpu256 (gpt/tiny at batch 256 on the CPU), cpu64, cpu16 [default: none].")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", help="Runs at once, each in its own process [default: 1].")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Text file or folder replacing the bundled corpus (text tasks) [default: the bundled corpus].")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rewrite results.md and settings.json of a finished experiment in --out.")] = False,
) -> None:
    """Run an experiment: every run resumable, then a Markdown results table and a figure."""
    if name not in EXPERIMENTS:
        raise GraftlabError(f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)}")
    if name != "transformer":  # the others have one task and no preset: a given one would be ignored
        for option, value in (("--task", task), ("--preset", preset)):
            if value is not None:
                raise GraftlabError(f"{option} applies to the transformer experiment only; {name} has none")
    if not (ROOT / "experiments" / f"{name}.py").exists():
        raise GraftlabError(f"experiments/{name}.py is not in this installation (run from a source checkout)")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from experiments.runner import Settings

    settings = Settings(out=None if out is None else str(out), quick=quick, steps=steps, size=size,
                        batch_size=batch_size, seeds=seeds, device=device, eval_size=eval_size,
                        threads=threads, progress=progress, task=task, preset=preset, jobs=jobs, data=data,
                        overwrite=overwrite)
    importlib.import_module(f"experiments.{name}").main(settings=settings)
