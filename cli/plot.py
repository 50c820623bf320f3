"""``graftlab plot``: render the paper's figures from traces."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from graftlab.cli.distill import ROUND_HELP


def plot(
    traces: List[Path] = typer.Argument(..., help="One trace, or two runs (e.g. two batch sizes) for figures 6-8."),
    figure: str = typer.Option("all", "--figure", "-f",
                               help="4, 5, 6, 7, 8, corrections, rows (a vocab trace's row ratios against token frequency), or all (the ones the traces can draw)."),
    out: str = typer.Option(..., "--out", "-o", help="Output file (one figure: .png, .pdf or .svg); with --figure all a directory (DIR/figure5.png, ...) or an image name (x.png -> x-figure5.png, x-figure6.png, ...)."),
    steps: Optional[List[int]] = typer.Option(
        None, "--steps", help="First N iterations for figures 5, 6, 8 (repeat once per trace) [default: 2000]."),
    width: Optional[int] = typer.Option(
        None, "--width", help="Median filter width (odd, at most 100001; 0 or 1 turns it off) [default: 51 for figures 4, 6, 8]."),
    window: Optional[int] = typer.Option(None, "--window", help="Corrections chart: median over the first WINDOW steps, as `graftlab distill` [default: 2000, capped to the first quarter of the trace]."),
    round: str = typer.Option("none", "--round", help=ROUND_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing figure files."),
) -> None:
    """Render Figures 4-8 (and the distilled corrections) from traces, e.g. --figure 5 -o fig5.png."""
    from graftlab.trace.foreign import note
    from graftlab.plots.render import render
    from graftlab.trace import read_metadata

    notes = [f"{trace}: {n}" for trace in traces if (n := note(read_metadata(trace)))]
    written = render(traces, figure, out, steps=steps, width=width, window=window, round=round, overwrite=overwrite)
    # after the outputs are checked and written: a refused command prints its one error line only
    for line in notes:
        typer.echo(line, err=True)
    for path in written:
        typer.echo(str(path))
