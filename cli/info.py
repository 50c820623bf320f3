"""``graftlab info TRACE``: a trace's metadata, groups (with kinds), step range and row count."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from graftlab.cli import options
from graftlab.cli.text import printable


def _fmt(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return "-" if value is None else str(value)


def _files(trace: Path, n: int, foreign: dict) -> str:
    """Where the rows are: "one CSV file", "one Parquet file", "3 part files", "42 Parquet files"."""
    if trace.is_file():
        return "one CSV file" if foreign.get("format") == "csv" else "one Parquet file"
    kind = "Parquet file" if foreign and not foreign.get("orphan") else "part file"
    return f"{'one' if n == 1 else n} {kind}{'' if n == 1 else 's'}"


def info(
    trace: Path = typer.Argument(..., help="Trace directory (or Parquet file) written by `graftlab record`, or a Parquet/CSV table of step, group, ratio from another tool."),
    groups: bool = typer.Option(True, "--groups/--no-groups", help="List the groups with their kinds."),
    max_groups: options.MaxGroups = options.SHOWN,
) -> None:
    """Describe a grafting trace without reading its data."""
    from rich.console import Console
    from rich.table import Table

    from graftlab.errors import GraftlabError
    from graftlab.trace.foreign import note, source
    from graftlab.trace import trace_info
    from graftlab.trace.lock import writer

    max_groups = options.check_max_groups(max_groups)
    live = writer(trace) if trace.is_dir() else None
    by = f"being written by {f'pid {live}' if live else 'another process'}"
    try:
        t = trace_info(trace)
    except GraftlabError as err:
        if live is None:
            raise
        raise GraftlabError(f"{trace}: {by}, which has not completed a part file yet; try again later") from None
    meta = t["metadata"]
    console = Console(markup=False)  # group names hold brackets: "key.bias[head 3]"
    head = Table(title=str(trace), show_header=False)
    head.add_column("key", style="bold")
    head.add_column("value", overflow="fold")
    foreign = meta.get("foreign") or {}
    for key in ("format", "granularity", "task", "batch_size", "seed", "device", "every"):
        value = source(meta) if key == "format" and foreign else meta.get(key)
        head.add_row(key, _fmt(value))
    for role in ("magnitude", "direction"):
        opt = meta.get(role) or {}
        head.add_row(role, f"{opt.get('class', '-')} {_fmt(opt.get('hyperparameters'))}")
    head.add_row("versions", _fmt(meta.get("versions")))
    head.add_row("steps", f"{_fmt(t['first_step'])} .. {_fmt(t['last_step'])} ({t['steps']} recorded)"
                 + "".join(f"; steps {a}..{b} missing (a part file is gone?)" for a, b in t.get("gaps") or []))
    head.add_row("rows", f"{t['rows']} rows in {_files(trace, t['parts'], foreign)}, "
                         f"{t['bytes'] / max(t['rows'], 1):.1f} bytes/row")
    computed = t.get("computed") or []
    head.add_row("columns", ", ".join(c for c in t["columns"] if c not in computed) + " (stored)"
                 + ("; ratio = norm_m / norm_d, computed on read" if "ratio" in computed else ""))
    extra = {k: v for k, v in meta.items() if k not in {
        "format", "granularity", "task", "batch_size", "seed", "device", "every", "magnitude", "direction",
        "versions", "groups", "foreign"}}
    for key, value in extra.items():
        head.add_row(key, _fmt(value))
    console.print(head)
    if live is not None:  # read_trace and distill read the complete parts: the steps above
        console.print(f"{by}: the steps above are the complete parts so far", soft_wrap=True)
    if note(meta):
        console.print(note(meta), soft_wrap=True)
    if groups:
        every = meta.get("groups") or []
        shown = options.first_groups(every, max_groups)
        table = Table(title=f"{len(every)} groups" + (f" (the first {len(shown)})" if len(shown) < len(every) else ""))
        for col in ("group", "kind", "ffn", "block", "shape", "numel"):
            # a group name is one token to copy: never wrapped, the table widens instead
            table.add_column(col, justify="right" if col in ("block", "numel") else "left",
                             overflow="fold", no_wrap=col == "group")
        for g in shown:
            table.add_row(printable(g["name"]), _fmt(g.get("kind")), _fmt(g.get("ffn")), _fmt(g.get("block")),
                          _fmt(g.get("shape")), _fmt(g.get("numel")))
        longest = max((len(printable(g["name"])) for g in shown), default=10)
        Console(width=max(console.width, longest + 60), markup=False).print(table)
        if len(shown) < len(every):
            console.print(f"{len(every) - len(shown)} more groups not listed (--max-groups 0 lists all)", soft_wrap=True)
