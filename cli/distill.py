"""``graftlab distill TRACE``: windowed medians of a trace's ratios -> a corrections file."""
from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Optional

import typer

from graftlab.cli import options
from graftlab.cli.text import printable


# one rounding help for every command that distills (distill, plot's corrections chart)
ROUND_HELP = ("Rounding: none; pow10 (each factor to a power of ten); D<beta> (e.g. D500: groups inside transformer "
              "blocks, or those --tie matches, get beta, the rest a power of ten); DA<beta> (the same, but only the "
              "attention weights Q, K, V are tied); `graftlab demo --round` also takes Dauto (beta from the run) [default: none].")


def _num(v, fmt: str = "{:.4g}") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _flag(d) -> str:
    """The flag with the few words of evidence behind a degenerate verdict."""
    short = (d.evidence or {}).get("short")
    return f"{d.flags} ({short})" if d.flags and short else d.flags


def distill(
    trace: Path = typer.Argument(..., help="Trace directory (or Parquet file) written by `graftlab record`, or a Parquet/CSV table of step, group, ratio from another tool."),
    window: Optional[int] = typer.Option(None, "--window", "-w", help="Steps per median window; the paper used 2000 at batch 8K, 500 at 32K [default: 2000, capped to the first quarter of the trace]."),
    round: str = typer.Option("none", "--round", "-r", help=ROUND_HELP),
    output: Optional[Path] = typer.Option(None, "--out", "--output", "-o", help="Corrections file [default: <TRACE>.corrections.<format> beside the trace]."),
    schedule: Optional[bool] = typer.Option(None, "--schedule/--static", help="Windowed schedule over the whole run, or static first-window multipliers [default: schedule for global traces]."),
    filter: Optional[int] = typer.Option(None, "--filter", help="Median-filter each group's ratios with this odd width first (at most 100001; 0 or 1 turns it off); the paper's figures use 51 [default: no filter]."),
    tie: Optional[str] = typer.Option(None, "--tie", help="Regex of group names that D<beta> ties to beta [default: groups inside transformer blocks]."),
    start: int = typer.Option(0, "--start", help="First step of the window."),
    outlier: float = typer.Option(0.0, "--outlier", help="Also flag groups whose median exceeds this many times the median over groups (0: off; degenerate groups are found from their gradients without it)."),
    format: str = typer.Option("json", "--format", help="json (what `graftlab train` reads) or csv (group, kind, factor)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    allow_divergence: bool = typer.Option(False, "--allow-divergence", help="Distill windows that follow a divergence (non-finite norms or restart marks) instead of refusing them."),
    max_groups: options.MaxGroups = options.SHOWN,
) -> None:
    """Distill per-group learning-rate corrections from a grafting trace."""
    from rich.console import Console
    from rich.table import Table

    from graftlab.corrections import save
    from graftlab.distill.pipeline import check_settings, check_window, default_output
    from graftlab.distill.pipeline import distill as run
    from graftlab.errors import GraftlabError
    from graftlab.trace.foreign import note as foreign_note
    from graftlab.trace.outputs import check_output

    max_groups = options.check_max_groups(max_groups)
    if format not in ("json", "csv"):
        raise GraftlabError(f"--format must be json or csv, not {format!r}")
    if not (math.isfinite(outlier) and outlier >= 0):
        raise GraftlabError(f"--outlier must be a finite number >= 0 (0: off), got {outlier}")
    check_settings(window, start, round, filter, tie=tie)  # a bad setting is the first thing said
    check_window(trace, window, start)  # then one that does not fit the trace (its metadata only)
    out = output if output is not None else default_output(trace, format)
    # every path before reading a large trace: the output is not the trace, nor inside a trace folder
    check_output(out, "corrections file", overwrite=overwrite, inputs=[("trace", trace)])
    if not out.parent.is_dir():
        raise GraftlabError(f"--out {str(out)!r}: its folder {str(out.parent)!r} does not exist")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        corr = run(trace, window=window, round=round, schedule=schedule, filter=filter, tie=tie, start=start,
                   outlier=outlier or None, allow_divergence=allow_divergence)
    notes = corr.source.get("warnings") or []
    for w in caught:  # the notes are printed below, one line each; anything else as Python shows it
        if not any(str(w.message).endswith(n) for n in notes):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    save(corr, out, format=format, overwrite=overwrite)

    src, records = corr.source, corr.group_sources
    mode, used = src["mode"], src["window"]
    if mode == "schedule":  # consecutive windows over the whole trace
        steps = f"steps {start}..{src['steps'][1]} in windows of {used}"
    else:
        steps = f"steps {start}..{start + used - 1}"
    table = Table(title=f"{trace}: {steps}, round {round}, {mode}" + (f", filter {filter}" if filter else ""))
    table.add_column("group", overflow="fold")
    for col in ("kind", "median", "factor", "finite", "drift", "flags"):
        table.add_column(col, justify="right" if col in ("median", "factor", "finite", "drift") else "left")
    shown = list(records.items()) if max_groups == 0 else list(itertools.islice(records.items(), max_groups))
    for g, d in shown:
        total = d.n_finite + d.n_nonfinite
        factor = _num(d.factor, "{:g}")
        if mode == "schedule" and len(corr.schedule.get(g, [])) > 1:
            factor += f" .. {corr.schedule[g][-1][1]:g} ({len(corr.schedule[g])} pieces)"
        table.add_row(printable(g), d.kind, _num(d.median), factor, f"{d.n_finite}/{total}", _num(d.drift, "{:.3g}x"),
                      ", ".join(f for f in (_flag(d), "tied" if d.tied and round.upper().startswith("D") else "") if f))
    longest = max((len(printable(g)) for g, _ in shown), default=10)
    console = Console(width=max(Console().width, longest + 80), markup=False)
    console.print(table)
    if len(shown) < len(records):
        console.print(f"{len(records) - len(shown)} more groups not listed (--max-groups 0 lists all; {out} holds every group)",
                      soft_wrap=True)
    if window is None:
        console.print(f"window {used} steps: the paper's 2000, capped to the first quarter of the trace "
                      f"(steps {src['steps'][0]}..{src['steps'][1]}); set it with --window")
    flagged = list(src["flagged"].items())
    for g, flag in (flagged if max_groups == 0 else flagged[:max_groups]):
        why = (records[g].evidence or {}).get("reason")
        console.print(f"flagged {printable(g)} ({flag}{': ' + why if why else ''}): uses the stand-in median "
                      f"{_num(records[g].stand_in)} ({src['fallback']}) before rounding")
    if 0 < max_groups < len(flagged):
        console.print(f"{len(flagged) - max_groups} more flagged groups not listed (each uses the stand-in median; "
                      f"--max-groups 0 lists all)", soft_wrap=True)
    if src["later_window_start"] is not None:
        console.print(f"drift = median over steps {src['later_window_start']}.. / median over the first window")
    for note in notes:
        console.print(f"warning: {note}", style="yellow", soft_wrap=True)
    if src.get("divergence"):
        div = src["divergence"]
        console.print(f"warning: {len(div['windows'])} window(s) hold steps that follow a divergence "
                      f"(from step {div['first']}); their factors come from a diverging or restarted run", style="yellow")
    lr = src.get("direction_lr")
    unknown = foreign_note(src.get("metadata") or {})
    if unknown:
        console.print(unknown, soft_wrap=True)  # one line, however wide the terminal
    base = f"D's recorded lr ({lr:g})" if lr is not None else "the lr D had in the run (the trace does not say)"
    console.print(f"factors are relative to {base}; wrote {out}")
