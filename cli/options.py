"""Command-line options shared by ``graftlab train`` and ``graftlab record``, defined once.

Every option defaults to None so a value from ``--config FILE`` is only replaced when the option is
given on the command line (``graftlab.runs.make_config`` applies the non-None ones)::

    def record(task: options.Task = None, steps: options.Steps = None, ...):
        cfg = make_config(config, RecordConfig, task=task, steps=steps, ...)
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Task = Annotated[Optional[str], typer.Option("--task", help="Built-in task: bert (masked LM on the KJV), gpt (causal LM on the KJV) or resnet (Fashion-MNIST) (default: bert).")]
Size = Annotated[Optional[str], typer.Option("--size", help="Model size: tiny (CPU, ~1 min), small, base (default: tiny).")]
Data = Annotated[Optional[Path], typer.Option("--data", help="Your data instead of the bundled set: .txt file/folder (bert, gpt), IDX folder or .npz (resnet) (default: the bundled set).")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (default: 300 unless --epochs).")]
Epochs = Annotated[Optional[float], typer.Option("--epochs", help="Passes over the training set, instead of --steps (default: none: --steps counts).")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Examples per step (default: 32).")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: D's recorded lr with --corrections, else the task's default for the optimizer).")]
Hparam = Annotated[Optional[list[str]], typer.Option("--hparam", help="Optimizer hyperparameter NAME=VALUE, repeatable (e.g. momentum=0.9, betas=0.9,0.98) (default: the task's for the optimizer).")]
Schedule = Annotated[Optional[str], typer.Option("--schedule", help="constant, poly, step or cosine (default: bert poly, resnet step).")]
Power = Annotated[Optional[float], typer.Option("--power", help="poly decay power, 1 is BERT's linear decay (default: 1).")]
Milestones = Annotated[Optional[str], typer.Option("--milestones", help="step schedule: comma-separated fractions of the run (default: the task's).")]
Gamma = Annotated[Optional[float], typer.Option("--gamma", help="step schedule decay factor (default: the task's).")]
Warmup = Annotated[Optional[float], typer.Option("--warmup", help="Warmup steps (>= 1) or fraction of the run (< 1) (default: task's).")]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or auto (default: auto).")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for PyTorch (default: 1, up to 9x faster than 2 on a loaded 2-core machine; on an idle machine give its core count).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for init, data order and masking (default: 0).")]
Config = Annotated[Optional[Path], typer.Option("--config", help="YAML or TOML file of settings; command-line options override it (default: none).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]
RecordOverwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing trace folder (and an existing --metrics file).")]
EvalEvery = Annotated[Optional[int], typer.Option("--eval-every", help="Evaluate on held-out data every N steps, 0 = only at the end (default: 100).")]
Metrics = Annotated[Optional[Path], typer.Option("--metrics", help="Parquet file for per-step loss, lr and eval metrics (default: none written).")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
Fsdp = Annotated[bool, typer.Option("--fsdp", help="Under torchrun: shard parameters with FSDP2 instead of replicating them (DDP).")]
CheckpointDir = Annotated[Optional[Path], typer.Option("--checkpoint-dir", help="Save torch.distributed.checkpoint directories here, one per checkpoint: step-N (default: no checkpoints).")]
CheckpointEvery = Annotated[Optional[int], typer.Option("--checkpoint-every", help="Steps between checkpoints (default: only at the end).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --checkpoint-dir, on any number of processes.")]
OnDivergence = Annotated[Optional[str], typer.Option("--on-divergence", help="When a loss or gradient stops being finite (checked every step): stop (exit code 3) or restart from the last good state with a smaller lr (default: stop).")]
DivergenceLrFactor = Annotated[Optional[float], typer.Option("--divergence-lr-factor", help="Each restart multiplies the learning rate by this (default: 0.5).")]
MaxRestarts = Annotated[Optional[int], typer.Option("--max-restarts", help="Restarts after divergences before the run stops anyway (default: 3).")]


def path_str(path: Optional[Path]) -> Optional[str]:
    """Config fields hold paths as strings."""
    return None if path is None else str(path)
