"""What every experiment script shares: resumable runs, corrections files, tables and timing.

An experiment is a list of runs, each identified by a name and written to
``<out>/runs/<name>.parquet`` (the metrics file of :func:`graftlab.runs.fit`, config and final
held-out metrics in its metadata). A run whose metrics file exists is skipped and read back, so an
interrupted experiment continues where it stopped::

    ex = Experiment("runs/transformer", quick=False)
    res = ex.train("sgd_lr0.1_s0", TrainConfig(task="bert", optimizer="sgd", lr=0.1, ...))
    rec = ex.record("graft_s0", RecordConfig(task="bert", magnitude="adam", direction="sgd", ...))
    corr = ex.corrections("median", lambda: distill(rec.trace, window=50))
    ex.write_table(frame, "results.md")

Metrics files are written atomically at the end of a run; a grafted run's trace directory without
its metrics file is an interrupted run and is recorded again from scratch.

Several runs at once: ``Settings.jobs > 1`` gives the experiment a pool of worker processes (spawned,
one CPU thread each unless ``threads`` says otherwise; on a GPU they share the device), and
:meth:`Experiment.batch` runs a list of :class:`Job` in it. lr grids and paired statistics are in
:mod:`experiments.stats`.

This module is the one place the experiments import graftlab's run API (``TrainConfig``,
``RecordConfig``, ``train``, ``record``, ``read_metrics``); the scripts take them from here.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from graftlab.corrections import Corrections, load_corrections, save
from graftlab.errors import GraftlabError

# graftlab's run API: imported here only, so a move of these names is one edit.
from graftlab.runs import RecordConfig, TrainConfig
from graftlab.runs import read_metrics
from graftlab.runs import record as record_run
from graftlab.runs import train as train_run

__all__ = ["Experiment", "Job", "RecordConfig", "Run", "Settings", "TrainConfig", "best", "lr_tag", "markdown",
           "mean_std", "pm", "quarter_medians", "read_metrics"]


@dataclass
class Settings:
    """Knobs every experiment takes from the command line (None: the experiment's default)."""

    out: Optional[str] = None  # output directory (default: runs/experiments/<name>, or <name>-quick)
    quick: bool = False  # a few steps, one seed, tiny grids: checks that the script works
    steps: Optional[int] = None  # optimizer steps per run
    size: Optional[str] = None  # task size: tiny | small | base
    batch_size: Optional[int] = None
    seeds: Optional[int] = None  # seeds for the final comparison (the grid runs on seed 0)
    device: Optional[str] = None  # cpu | cuda | auto (None: auto, or the preset's device)
    eval_size: Optional[int] = None  # held-out sequences/images per evaluation
    threads: Optional[int] = None  # torch CPU threads (default: 1, best on a shared machine)
    progress: bool = False  # per-run progress bars
    task: Optional[str] = None  # which built-in task (experiments that take several)
    preset: Optional[str] = None  # a named set of defaults (transformer: gpu)
    jobs: Optional[int] = None  # runs at once, each in its own process (default 1)
    data: Optional[str] = None  # a text file or folder replacing the bundled corpus (text tasks)
    overwrite: bool = False  # rewrite results.md and settings.json of a finished experiment in out
    finished_only: bool = False  # start no run: write the tables from the runs already finished

    @classmethod
    def from_argv(cls, name: str, description: str, argv: Optional[Sequence[str]] = None) -> "Settings":
        p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description)
        p.add_argument("--out", help="output directory (default: runs/experiments/NAME)")
        p.add_argument("--quick", action="store_true", help="a few steps, one seed, tiny grids")
        p.add_argument("--steps", type=int, help="optimizer steps per run")
        p.add_argument("--size", choices=["tiny", "small", "base"], help="task size")
        p.add_argument("--batch-size", type=int, dest="batch_size")
        p.add_argument("--seeds", type=int, help="seeds for the final comparison")
        p.add_argument("--device", help="cpu, cuda or auto (default: auto, or the preset's)")
        p.add_argument("--eval-size", type=int, dest="eval_size", help="held-out examples per evaluation")
        p.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
        p.add_argument("--progress", action="store_true", help="show a progress bar per run")
        p.add_argument("--task", help="built-in task, where the experiment takes several")
        p.add_argument("--preset", help="a named set of defaults (transformer: gpu)")
        p.add_argument("--jobs", type=int, help="runs at once, each in its own process (default 1)")
        p.add_argument("--data", help="text file or folder replacing the bundled corpus")
        p.add_argument("--overwrite", action="store_true", help="rewrite the tables of a finished experiment")
        p.add_argument("--finished-only", action="store_true", dest="finished_only",
                       help="start no run: tables from the finished runs (methods with missing seeds are "
                            "reported on the seeds they have, the missing runs listed)")
        return cls(**vars(p.parse_args(argv)))

    def validate(self) -> None:
        """Every setting, before anything is created; raises GraftlabError."""
        from graftlab.tasks import SIZES
        from graftlab.distributed.env import resolve_device

        for name in ("steps", "batch_size", "seeds", "eval_size", "threads", "jobs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GraftlabError(f"{name} must be at least 1, got {value}")
        if self.size is not None and self.size not in SIZES:
            raise GraftlabError(f"unknown size {self.size!r}: choose one of {', '.join(SIZES)}")
        resolve_device(self.device)

    def pick(self, name: str, full: Any, quick: Any) -> Any:
        """The user's value for ``name`` if given, else the quick or the full default."""
        value = getattr(self, name)
        if value is not None:
            return value
        return quick if self.quick else full


@dataclass
class Run:
    """One finished run, read back from its metrics file."""

    name: str
    metrics: pd.DataFrame
    meta: dict[str, Any]
    skipped: bool  # True when the file already existed (resumed experiment)
    trace: Optional[Path] = None

    @property
    def final(self) -> dict[str, float]:
        return {k: (float(v) if v is not None else math.nan) for k, v in (self.meta.get("final") or {}).items()}

    @property
    def diverged(self) -> bool:
        return self.meta.get("diverged_at") is not None or not all(math.isfinite(v) for v in self.final.values())

    def evals(self, key: str = "loss") -> pd.Series:
        """Held-out ``key`` by step (steps counted from 1: the value after that many steps)."""
        col = f"eval_{key}"
        if col not in self.metrics:
            return pd.Series(dtype=float)
        rows = self.metrics.dropna(subset=[col])
        return pd.Series(rows[col].to_numpy(), index=rows["step"].to_numpy() + 1, name=self.name)


@dataclass(frozen=True)
class Job:
    """One run to do: ``kind`` is ``train`` (plain, optionally with a corrections file) or ``record``
    (grafted, writing ``traces/<name>``)."""

    name: str
    config: Any
    kind: str = "train"
    corrections: Optional[Path] = None


def _work(kind: str, config: Any, corrections: Optional[str], threads: int) -> None:
    """Body of one run in a worker process (the metrics file is its result)."""
    from graftlab.io.notes import one_line_warnings

    torch.set_num_threads(threads)
    with one_line_warnings():  # a worker process's warnings read as the command's own lines
        if kind == "record":
            # a trace without its metrics file is an interrupted run: record it again from scratch
            record_run(config, overwrite=True, progress=False)
        else:
            train_run(config, corrections=corrections, progress=False)


@dataclass
class Experiment:
    """The output directory of one experiment and the runs in it (see the module docstring)."""

    name: str
    out: Path
    settings: Settings
    runs: dict[str, Run] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    pool: Optional[cf.ProcessPoolExecutor] = None
    missing: list[str] = field(default_factory=list)  # runs not done (finished_only)

    @classmethod
    def open(cls, name: str, settings: Settings) -> "Experiment":
        """The experiment's output folder, created once every setting and path is checked: a new
        folder, or one holding this experiment's finished runs (reused). Its tables
        (``results.md``, ``settings.json``) are only rewritten with ``settings.overwrite``."""
        from graftlab.errors import OutputExistsError
        from graftlab.trace.outputs import check_output

        settings.validate()
        out = Path(settings.out or f"runs/experiments/{name}{'-quick' if settings.quick else ''}").expanduser()
        check_output(out, "out", folder=True)  # no file in its path, not a trace folder nor inside one
        for table in ("results.md", "settings.json"):
            if (out / table).exists() and not settings.overwrite:
                raise OutputExistsError(out / table, "results of a finished experiment")
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "traces").mkdir(exist_ok=True)
        (out / "corrections").mkdir(exist_ok=True)
        torch.set_num_threads(settings.threads or 1)
        return cls(name, out, settings)

    # ---------------------------------------------------------------------------------- runs
    def metrics_path(self, name: str) -> Path:
        return self.out / "runs" / f"{name}.parquet"

    def _done(self, name: str, config: Any) -> Optional[Run]:
        if name in self.runs:  # asked again in this process (a grid run reused as a baseline)
            return self.runs[name]
        path = self.metrics_path(name)
        if not path.exists():
            return None
        frame, meta = read_metrics(path)
        _check_same(name, path, meta.get("config") or {}, config)
        if meta.get("interrupted"):  # stopped by a signal: its metrics are partial, so it runs again
            self.say(f"{'undone' if self.settings.finished_only else 'redo  '} {name}: interrupted at step {meta.get('steps')}")
            path.unlink()
            return None
        trace = self.out / "traces" / name
        run = Run(name, frame, meta, True, trace if trace.exists() else None)
        self.runs[name] = run
        self.say(f"skip  {name}: done ({_fmt_final(run)})")
        return run

    def train(self, name: str, config: Any, corrections: Optional[Path] = None, **extra: Any) -> Run:
        """A plain run (:func:`graftlab.runs.train`); skipped when its metrics file exists."""
        return self.batch([Job(name, config, "train", corrections)])[0]

    def record(self, name: str, config: Any) -> Run:
        """A grafted run (:func:`graftlab.runs.record`) writing ``traces/<name>``; resumable."""
        return self.batch([Job(name, config, "record")])[0]

    def batch(self, jobs: Sequence[Job]) -> list[Run]:
        """Run ``jobs`` (finished ones are read back), ``settings.jobs`` at a time; in order. With
        ``settings.finished_only`` nothing is run: only the finished ones come back (in order) and
        the others are noted in :attr:`missing`."""
        out: dict[str, Run] = {}
        todo: list[tuple[Job, Any]] = []
        for job in jobs:
            done = self._done(job.name, job.config)
            if done is not None:
                out[job.name] = done
                continue
            if self.settings.finished_only:
                self.missing.append(job.name)
                continue
            cfg = dataclasses.replace(job.config, metrics=str(self.metrics_path(job.name)))
            if job.kind == "record":
                cfg = dataclasses.replace(cfg, out=str(self.out / "traces" / job.name))
            todo.append((job, cfg))
        threads = self.settings.threads or 1
        workers = max(1, int(self.settings.jobs or 1))
        if workers == 1 or len(todo) <= 1:
            for job, cfg in todo:
                self.say(f"run   {job.name}{' (grafted, trace)' if job.kind == 'record' else ''} ...")
                if job.kind == "record":
                    record_run(cfg, overwrite=True, progress=self.settings.progress)
                else:
                    train_run(cfg, corrections=job.corrections, progress=self.settings.progress)
                out[job.name] = self._finished(job)
        else:
            if self.pool is None:
                # spawn: CUDA cannot be used in forked children; each worker keeps its own data cache
                self.pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            futures = {}
            for job, cfg in todo:
                corr = None if job.corrections is None else str(job.corrections)
                futures[self.pool.submit(_work, job.kind, cfg, corr, threads)] = job
                self.say(f"start {job.name}{' (grafted, trace)' if job.kind == 'record' else ''}")
            for fut in cf.as_completed(futures):
                fut.result()  # a failed run stops the experiment with its own error
                job = futures[fut]
                out[job.name] = self._finished(job)
        return [out[job.name] for job in jobs if job.name in out]

    def _finished(self, job: Job) -> Run:
        frame, meta = read_metrics(self.metrics_path(job.name))
        trace = self.out / "traces" / job.name if job.kind == "record" else None
        run = Run(job.name, frame, meta, False, trace)
        self.runs[job.name] = run
        self.say(f"done  {job.name}: {_fmt_final(run)}, {meta['wall_time']:.0f} s")
        return run

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def corrections(self, name: str, make: Callable[[], Corrections]) -> Path:
        """``corrections/<name>.json`` from ``make()``, computed once and kept."""
        path = self.out / "corrections" / f"{name}.json"
        if not path.exists():
            save(make(), path)
        return path

    def load(self, name: str) -> Corrections:
        return load_corrections(self.out / "corrections" / f"{name}.json")

    # ------------------------------------------------------------------------------- output
    def say(self, text: str) -> None:
        line = f"[{self.name} {time.time() - self.started:7.0f}s] {text}"
        self.log.append(line)
        print(line, flush=True)

    def write(self, filename: str, text: str) -> Path:
        from graftlab.io.outputs import write_text

        return write_text(self.out / filename, text)

    def save_figure(self, fig: Any, filename: str) -> Path:
        import matplotlib.pyplot as plt

        from graftlab.io.outputs import write_atomic

        path = self.out / filename
        try:
            write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix[1:]))
        finally:
            plt.close(fig)
        return path

    def run_table(self) -> pd.DataFrame:
        """Every run of the experiment: final held-out metrics, steps, divergence, wall time."""
        rows = []
        for name, run in self.runs.items():
            cfg = run.meta.get("config") or {}
            rows.append({
                "run": name, **{f"eval_{k}": v for k, v in run.final.items()},
                "steps": run.meta.get("steps"), "diverged_at": run.meta.get("diverged_at"),
                "wall_s": run.meta.get("wall_time"), "steps_per_s": run.meta.get("steps_per_second"),
                "seed": cfg.get("seed"), "batch_size": cfg.get("batch_size"),
            })
        return pd.DataFrame(rows)

    def finish(self, body: str, settings_used: dict[str, Any]) -> Path:
        """Write ``runs.csv``, ``settings.json`` and ``results.md`` (``body`` plus run list, machine)."""
        table = self.run_table()
        self.write("runs.csv", table.to_csv(index=False))
        wall = float(np.nansum(table["wall_s"].to_numpy(dtype=float))) if len(table) else 0.0
        info = {"experiment": self.name, **settings_used, "machine": machine(), "run_wall_s_total": wall}
        self.write("settings.json", json.dumps(info, indent=1, default=str) + "\n")
        text = (
            f"{body}\n\n## Runs\n\n{markdown(table, floatfmt='.4g')}\n\n"
            f"Sum of run wall times: {wall / 60:.1f} min on {info['machine']}.\n"
        )
        return self.write("results.md", text)


# Settings that make a finished run a different run; a mismatch means the out dir holds another experiment.
_IDENTITY = ("task", "size", "steps", "batch_size", "seed", "optimizer", "lr", "magnitude", "direction",
             "magnitude_lr", "direction_lr", "granularity", "schedule")


def _check_same(name: str, path: Path, stored: dict[str, Any], config: Any) -> None:
    wanted = dataclasses.asdict(config)
    for key in _IDENTITY:
        if key not in wanted or key not in stored or wanted[key] is None:
            continue
        a, b = stored[key], wanted[key]
        same = math.isclose(a, b, rel_tol=1e-12) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else a == b
        if not same:
            raise GraftlabError(
                f"{path} was run with {key}={a!r}, this experiment asks for {b!r}: use another --out "
                "(finished runs are only reused when their settings match)"
            )


def _fmt_final(run: Run) -> str:
    out = ", ".join(f"{k} {v:.4f}" for k, v in run.final.items())
    return out + (f" (diverged at {run.meta.get('diverged_at')})" if run.meta.get("diverged_at") is not None else "")


def machine() -> str:
    """One line naming the machine: CPU model and cores, or the GPU, plus torch."""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        model = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        dev = f"{model}, {os.cpu_count()} cores"
    return f"{dev}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def markdown(frame: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A DataFrame as a GitHub Markdown table (no tabulate dependency)."""
    cols = list(frame.columns)

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, (float, np.floating)):
            return format(float(v), floatfmt)
        return str(v)

    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    columns = [frame[c].tolist() for c in cols]  # per column: a row of mixed types stays as it is
    for row in zip(*columns):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def best(runs: dict[str, Run], key: str = "loss") -> str:
    """Name of the run with the lowest final held-out ``key`` (diverged runs last)."""
    def score(name: str) -> float:
        v = runs[name].final.get(key, math.nan)
        return v if math.isfinite(v) and not runs[name].diverged else math.inf

    return min(runs, key=score)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(np.mean(arr)), float(np.std(arr, ddof=1)) if arr.size > 1 else math.nan


def pm(mean: float, std: float, fmt: str = ".4f") -> str:
    if not math.isfinite(mean):
        return "diverged" if math.isinf(mean) or math.isnan(mean) else "-"
    return format(mean, fmt) + ("" if not math.isfinite(std) else f" ± {format(std, fmt)}")


def lr_tag(lr: float) -> str:
    return f"{lr:g}"


def quarter_medians(df: pd.DataFrame, steps: int, kinds: dict[str, str], normalise_lr: bool = False) -> pd.DataFrame:
    """Per kind and quarter of training: the median over groups of each group's median ratio.

    With ``normalise_lr`` every ratio is divided by M's lr at that step relative to its peak, so
    what remains is the drift that the run's own lr schedule does not explain. Non-finite ratios
    are skipped; flagged (degenerate) groups should be removed by the caller.
    """
    df = df[np.isfinite(df["ratio"].to_numpy(dtype=float))].copy()
    if normalise_lr and "lr" in df:
        lr = df["lr"].to_numpy(dtype=float)
        df["ratio"] = df["ratio"] / (lr / np.nanmax(lr))
    df["quarter"] = np.minimum(df["step"].to_numpy() * 4 // max(steps, 1), 3) + 1
    per_group = df.groupby(["quarter", "group"])["ratio"].median().reset_index()
    per_group["kind"] = per_group["group"].map(lambda g: kinds.get(g, "other"))
    table = per_group.groupby(["kind", "quarter"])["ratio"].median().unstack("quarter")
    table.columns = [f"Q{c}" for c in table.columns]
    return table

