"""The whole pipeline in one call: record Adam#SGD on ``bert``, distill it, train plain SGD with it.

    from graftlab.demo import DemoConfig, run_demo
    res = run_demo(DemoConfig())            # about 2-3 minutes on a 2-core CPU
    print(res.table)                        # held-out MLM accuracy and loss of each run
    res.folder                              # runs/demo-<timestamp>/: trace, corrections, metrics, figures

Steps, in one process (the task's data and tokenizer are built once):

1. record a layer-wise Adam#SGD trace (M=Adam gives each layer's step size, D=SGD the direction);
2. distill it: median ratio per group over the first ``window`` steps (default: the first half of the
   recording, which holds the warmup peak), unrounded (``round="none"``: the paper's "SGD (Medians)").
   ``round="Dauto"`` gives ``D<beta>`` with beta chosen from this run (the median over the
   transformer-block groups' medians, to two significant digits). On the default 300-step run
   (batch 16, 2-core CPU) the unrounded first-half medians closed about 40% of the SGD-Adam loss gap,
   while D_beta (beta 4.8), pow10 rounding and whole-run medians all ended with a higher loss than
   plain SGD: at this scale Q and K need about 200x the correction of the other block groups,
   which one tied beta cannot give;
3. train, from the same initialisation and data order: SGD at D's recorded learning rate, SGD with
   the corrections (a static per-layer multiplier on that rate), SGD with a per-layer *schedule*
   (``distill(schedule=True)``: the median of each group's ratios over each eighth of the recording,
   which follows the drift of the ratios that a static factor cannot), and Adam at M's rate;
4. write the results table (``results.csv``), the trace's figures (``figures/``) and print the table.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from graftlab.errors import GraftlabError

RUNS = Path("runs")
SCHEDULE_PIECES = 8  # windows of the per-layer schedule over the recording


@dataclass
class DemoConfig:
    steps: int = 300  # steps of every run (the recording and the three trainings)
    batch_size: int = 16
    size: str = "tiny"
    window: Optional[int] = None  # distill window; None: the first half of the recording
    round: str = "none"  # none | pow10 | D<beta> | Dauto (D<beta> with beta from this run)
    magnitude_lr: Optional[float] = None  # Adam's lr (None: the task's default)
    direction_lr: Optional[float] = None  # SGD's lr (None: the task's default)
    momentum: float = 0.0  # SGD momentum (the same in D and in the SGD runs)
    seed: int = 0
    device: str = "cpu"
    eval_size: Optional[int] = None
    out: Optional[str] = None  # folder to create; None: runs/demo-<timestamp>/
    figures: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoConfig":
        """A sub-minute version (for tests): few steps, a small batch and held-out set."""
        base = dict(steps=40, batch_size=8, eval_size=32, window=20)
        base.update(overrides)
        return cls(**base)


@dataclass
class DemoResult:
    folder: Path
    table: pd.DataFrame  # one row per run: run, optimizer, lr, mlm_accuracy, mlm_loss, steps, diverged_at, seconds
    window: int
    round: str
    beta: Optional[float]
    figures: list[Path] = field(default_factory=list)
    wall_time: float = 0.0


def new_folder(out: Optional[str | Path] = None, root: Path = RUNS) -> Path:
    """Create the demo's output folder: ``out`` (must not exist) or a new ``runs/demo-<timestamp>``."""
    if out is not None:
        path = Path(out).expanduser()
        if path.exists():
            raise GraftlabError(f"{path} exists: the demo writes into a new folder (give another --out)")
        path.mkdir(parents=True)
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = root / (f"demo-{stamp}" if i == 0 else f"demo-{stamp}-{i}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise GraftlabError(f"could not create a new demo folder under {root}")


def choose_beta(corrections) -> Optional[float]:
    """beta for D_beta: the median over in-block, unflagged groups' medians, to two significant digits."""
    info = corrections.source.get("groups") or {}
    vals = sorted(d["median"] for d in info.values()
                  if d.get("tied") and not d.get("flags") and isinstance(d.get("median"), (int, float))
                  and math.isfinite(d["median"]) and d["median"] > 0)
    if not vals:
        return None
    n = len(vals)
    med = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
    digits = 1 - int(math.floor(math.log10(med)))
    return float(round(med, digits))


def _row(name: str, optimizer: str, lr, fit, **extra: Any) -> dict[str, Any]:
    return {"run": name, "optimizer": optimizer, "lr": lr, "mlm_accuracy": fit.final.get("accuracy"),
            "mlm_loss": fit.final.get("loss"), "steps": fit.steps, "diverged_at": fit.diverged_at,
            "seconds": round(fit.wall_time, 1), **extra}


def run_demo(config: DemoConfig, *, progress: bool = True, echo: Callable[[str], None] = print) -> DemoResult:
    """Record, distill, train and compare (see the module doc); returns the table and the folder."""
    from graftlab.corrections import save
    from graftlab.distill import distill
    from graftlab.record import RecordConfig, record
    from graftlab.train import TrainConfig, train

    if config.steps < 4:
        raise GraftlabError(f"the demo needs at least 4 steps, got {config.steps}")
    window = config.window or config.steps // 2
    if not 1 <= window <= config.steps:
        raise GraftlabError(f"window must be between 1 and the steps ({config.steps}), got {window}")
    t0 = time.perf_counter()
    folder = new_folder(config.out)
    echo(f"demo: writing into {folder}")
    sgd = {"momentum": config.momentum} if config.momentum else {}

    # 1. record
    echo(f"[1/4] recording Adam#SGD (layer-wise) on bert/{config.size}, {config.steps} steps, batch {config.batch_size}")
    rec = record(RecordConfig(
        task="bert", size=config.size, steps=config.steps, batch_size=config.batch_size, magnitude="adam",
        direction="sgd", magnitude_lr=config.magnitude_lr, direction_lr=config.direction_lr, d_hparams=sgd,
        granularity="layer", device=config.device, seed=config.seed, eval_every=0, eval_size=config.eval_size,
        out=str(folder / "trace")), progress=progress)
    from graftlab.trace import read_metadata

    rec_cfg = read_metadata(rec.trace)["config"]  # the learning rates the recording resolved
    m_lr, d_lr = float(rec_cfg["magnitude_lr"]), float(rec_cfg["direction_lr"])

    # 2. distill
    beta = None
    spec = config.round
    if spec.lower() == "dauto":
        beta = choose_beta(distill(rec.trace, window=window, round="none"))
        if beta is None:
            raise GraftlabError("--round Dauto needs groups inside transformer blocks with a usable median")
        spec = f"D{beta:g}"
    corr = distill(rec.trace, window=window, round=spec)
    corr_path = save(corr, folder / "corrections.json")
    echo(f"[2/4] distilled the first {window} steps with --round {spec} -> {corr_path}")
    pieces = max(1, config.steps // SCHEDULE_PIECES)
    sched_path = save(distill(rec.trace, window=pieces, schedule=True), folder / "corrections-schedule.json")
    echo(f"      and a per-layer schedule (medians of every {pieces} steps over the whole run) -> {sched_path}")
    flagged = corr.source.get("flagged") or {}
    if flagged:
        echo(f"      flagged (use their kind's median): {', '.join(f'{g} ({f})' for g, f in flagged.items())}")

    # 3. train
    def run(name: str, optimizer: str, lr: float, hparams: dict, corrections: Optional[Path] = None,
            schedule: Optional[str] = None, warmup: Optional[float] = None, **extra: Any):
        echo(f"[3/4] training {name}")
        cfg = TrainConfig(task="bert", size=config.size, steps=config.steps, batch_size=config.batch_size,
                          optimizer=optimizer, lr=lr, hparams=hparams, schedule=schedule, warmup=warmup,
                          device=config.device, seed=config.seed,
                          eval_every=0, eval_size=config.eval_size, metrics=str(folder / f"metrics-{name}.parquet"))
        return _row(name, optimizer, f"{lr:g}", train(cfg, corrections=corrections, progress=progress), **extra)

    rows = [
        _row("Adam#SGD (recorded)", "adam#sgd", f"{m_lr:g}#{d_lr:g}", rec.fit),
        run("sgd", "sgd", d_lr, sgd),
        run("sgd+corrections", "sgd", d_lr, sgd, corrections=corr_path),
        # the schedule's pieces already carry Adam's warmup and decay, so the run adds none of its own
        run("sgd+schedule", "sgd", d_lr, sgd, corrections=sched_path, schedule="constant", warmup=0.0),
        run("adam", "adam", m_lr, {}),
    ]
    table = pd.DataFrame(rows)
    table.to_csv(folder / "results.csv", index=False)

    # 4. figures
    figures: list[Path] = []
    if config.figures:
        from graftlab.plots.render import render

        figures = render([rec.trace], "all", folder / "figures", steps=[config.steps], window=window, round=spec)
        echo(f"[4/4] figures: {', '.join(str(p) for p in figures)}")
    wall = time.perf_counter() - t0
    summary = {"config": dataclasses.asdict(config), "window": window, "round": spec, "beta": beta,
               "magnitude_lr": m_lr, "direction_lr": d_lr, "wall_time": wall, "results": rows}
    (folder / "demo.json").write_text(json.dumps(summary, indent=1, default=str))
    return DemoResult(folder, table, window, spec, beta, figures, wall)


def format_table(table: pd.DataFrame) -> str:
    """The results table as Markdown (what the README shows)."""
    lines = ["| run | optimizer | lr | held-out MLM accuracy | held-out MLM loss |", "|---|---|---|---|---|"]
    for r in table.itertuples():
        note = f" (diverged at step {int(r.diverged_at)})" if pd.notna(r.diverged_at) else ""
        lines.append(f"| {r.run}{note} | {r.optimizer} | {r.lr} | {r.mlm_accuracy:.4f} | {r.mlm_loss:.4f} |")
    return "\n".join(lines)
