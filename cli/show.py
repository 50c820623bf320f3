"""``graftlab show C.json [C2.json ...]``: corrections files side by side, with the drift."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List

import typer


def show(
    files: List[Path] = typer.Argument(..., help="Corrections files written by `graftlab distill` (JSON)."),
    by: str = typer.Option("group", "--by", help="group (one row per group) or kind (medians over each kind's groups)."),
) -> None:
    """Show corrections files side by side: factors per group (or kind), medians and drift."""
    from rich.console import Console
    from rich.table import Table

    from graftlab.corrections import compare

    df = compare(*files, by=by)
    table = Table(title=" vs ".join(str(f) for f in files) + f", per {by}")
    table.add_column(df.index.name or by, no_wrap=True)
    for col in df.columns:
        table.add_column(col, justify="left" if col == "kind" else "right")
    for name, row in df.iterrows():
        table.add_row(str(name), *(_cell(col, v) for col, v in row.items()))
    longest = max((len(str(n)) for n in df.index), default=10)
    console = Console()
    Console(width=max(console.width, longest + 14 * len(df.columns))).print(table)
    if any(c.startswith("drift") for c in df.columns):
        console.print("drift = median ratio over the trace's last window / over the first window "
                      "(far from 1: a static factor fits only part of the run)")


def _cell(col: str, v) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if col == "groups":
        return str(int(v))
    return f"{v:.3g}x" if col.startswith("drift") or col == "factor ratio" else f"{v:.4g}"
