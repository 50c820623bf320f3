"""``graftlab show C.json [C2.json ...]``: corrections files side by side, with the drift."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List

import typer

from graftlab.cli import options
from graftlab.cli.text import printable

# files past the first few get letters too; a table of three files or more may pass 100 columns
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
WIDTH = 100  # the kind table of two files fits this many columns


def show(
    files: List[Path] = typer.Argument(..., help="Corrections files written by `graftlab distill` (JSON)."),
    by: str = typer.Option("group", "--by", help="group (one row per group) or kind (medians over each kind's unflagged groups)."),
    max_groups: options.MaxGroups = options.SHOWN,
) -> None:
    """Show corrections files side by side: factors per group (or kind), medians and drift."""
    from rich.console import Console
    from rich.table import Table

    from graftlab.corrections import compare, load_corrections
    from graftlab.errors import GraftlabError

    max_groups = options.check_max_groups(max_groups)
    if len(files) > len(_LETTERS):
        raise GraftlabError(f"show takes at most {len(_LETTERS)} corrections files, got {len(files)}")
    # one letter per file in the headers (the legend names the files): a file name would not fit
    letters = list(_LETTERS[:len(files)])
    corrs = [load_corrections(f) for f in files]
    df = compare(*corrs, labels=letters, by=by)
    flagged = df.pop("flagged") if "flagged" in df.columns else None
    partial = df.pop("partial") if "partial" in df.columns else None
    table = Table(title=(f"{files[0]}, per {by}" if len(files) == 1 else f"per {by}"))
    table.add_column(df.index.name or by, no_wrap=True)
    for col in df.columns:
        table.add_column(_header(col, len(files)), justify="left" if col == "kind" else "right")
    rows = df if by == "kind" else df.iloc[:len(options.first_groups(df.index, max_groups))]
    for name, row in rows.iterrows():
        table.add_row(printable(name), *(_cell(col, v) for col, v in row.items()))
    longest = max((len(printable(n)) for n in rows.index), default=10)
    console = Console(markup=False)  # group names hold brackets: "key.bias[head 3]"
    need = WIDTH if by == "kind" else longest + 12 * len(df.columns)
    Console(width=max(console.width, need), markup=False).print(table)
    if len(rows) < len(df):
        console.print(f"{len(df) - len(rows)} more groups not listed (--max-groups 0 lists all)", soft_wrap=True)
    if len(files) > 1:
        legend = ", ".join(f"{k} = {f}" for k, f in zip(letters, files))
        console.print(legend + ("; ratio B/A = factor B / factor A" if len(files) == 2 else ""), soft_wrap=True)
    lrs = [c.direction_lr for c in corrs]
    if len(set(lrs)) > 1:  # each file's factors multiply its own D lr: equal factors are not equal lrs
        said = ", ".join(f"{k} {'unknown' if lr is None else f'{lr:g}'}" for k, lr in zip(letters, lrs))
        console.print(f"warning: the factors are relative to different D learning rates ({said}): "
                      "compare lr x factor, not the factors", soft_wrap=True)
    if partial is not None and partial.sum():
        per_kind = ", ".join(f"{k}: {int(n)}" for k, n in partial.items() if n)
        console.print(f"kind medians are over the groups every file holds: {int(partial.sum())} group(s) only "
                      f"some files hold are left out ({per_kind}); --by group lists them", soft_wrap=True)
    if flagged is not None and flagged.sum():
        per_kind = ", ".join(f"{k}: {int(n)}" for k, n in flagged.items() if n)
        console.print(f"left out of the kind medians: {int(flagged.sum())} flagged group(s) ({per_kind}); "
                      "--by group lists them", soft_wrap=True)
    if any(c.startswith("drift") for c in df.columns):
        console.print("drift = median ratio over the trace's last window / over the first window "
                      "(far from 1: a static factor fits only part of the run)")


def _header(col: str, n_files: int) -> str:
    if col == "factor ratio":
        return "ratio B/A"
    return col.rsplit(" ", 1)[0] if n_files == 1 and " " in col else col


def _cell(col: str, v) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if col == "groups":
        return str(int(v))
    return f"{v:.3g}x" if col.startswith("drift") or col == "factor ratio" else f"{v:.4g}"
