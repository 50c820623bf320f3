"""``graftlab record``: train a built-in task with M#D and stream per-group ratios to a Parquet trace."""
from __future__ import annotations

from typing import Annotated

import typer

from graftlab.cli import options
from graftlab.runs.config import RecordConfig


@options.run_options(RecordConfig)
def record(
    values: dict,
    config: options.Config = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing trace folder (and an existing --metrics file).")] = False,
    quiet: options.Quiet = False,
) -> None:
    """Record per-group grafting ratios ||M step|| / ||D step|| of a training run."""
    from graftlab.distributed import is_main
    from graftlab.runs import make_config
    from graftlab.runs import record as run

    cfg = make_config(config, RecordConfig, **values)
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
