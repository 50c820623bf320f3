"""Render figures to files: what ``graftlab plot`` does.

    from graftlab.plots.render import render
    render(["trace_bs32", "trace_bs128"], "all", "figures/")       # figures/figure5.png, ...
    render(["trace_bs32"], "5", "fig5.png", steps=[2000])
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import matplotlib.pyplot as plt

from graftlab.errors import GraftlabError
from graftlab.plots.common import PathLike
from graftlab.trace import read_metadata

FIGURES = ("4", "5", "6", "7", "8", "corrections")
FILENAMES = {"4": "figure4", "5": "figure5", "6": "figure6", "7": "figure7", "8": "figure8",
             "corrections": "corrections"}


def applicable(trace: PathLike) -> list[str]:
    """The figures a trace can draw: Figure 4 for a global trace, the per-layer ones otherwise."""
    meta = read_metadata(trace)
    if meta.get("granularity") == "global" or len(meta.get("groups") or []) == 1:
        return ["4"]
    return ["5", "6", "7", "8", "corrections"]


def _steps(steps: Optional[Sequence[int]], n: int, default: int = 2000):
    steps = list(steps or [])
    if len(steps) > n:
        raise GraftlabError(f"got {len(steps)} --steps values for {n} trace(s)")
    if any(s <= 0 for s in steps):
        raise GraftlabError(f"--steps must be positive, got {steps}")
    return (steps + [steps[-1] if steps else default] * n)[:n]


def draw(traces: Sequence[PathLike], figure: str, *, steps: Optional[Sequence[int]] = None,
         width: Optional[int] = None, window: int = 2000, round: str = "pow10"):
    """One figure as a matplotlib Figure (see :func:`render` for the arguments)."""
    from graftlab import plots

    traces = list(traces)
    if not 1 <= len(traces) <= 2:
        raise GraftlabError(f"give one or two traces, got {len(traces)}")
    if figure not in FIGURES:
        raise GraftlabError(f"unknown figure {figure!r}: expected one of {', '.join(FIGURES)} or all")
    if figure in ("4", "5", "corrections") and len(traces) > 1:
        raise GraftlabError(f"figure {figure} draws one trace, got {len(traces)}")
    n = _steps(steps, len(traces))
    wide = {} if width is None else {"width": None if width <= 1 else width}
    if figure == "4":
        return plots.figure4(traces[0], **wide)
    if figure == "5":
        return plots.figure5(traces[0], steps=n[0], **wide)
    if figure == "6":
        return plots.figure6(*traces, steps=n, **wide)
    if figure == "7":
        return plots.figure7(*traces, **wide)
    if figure == "8":
        return plots.figure8(*traces, steps=n, **wide)
    from graftlab.trace import trace_extent

    first, last = trace_extent(traces[0])
    # a trace shorter than the window is distilled over all of it
    return plots.corrections_bars(traces[0], window=min(window, last - first + 1), round=round,
                                  filter=width if width and width > 1 else None)


def _check_new(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise GraftlabError(f"{path} exists (pass --overwrite to replace it)")


def _save(fig, path: Path, dpi: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def render(traces: Sequence[PathLike], figure: str, out: PathLike, *, steps: Optional[Sequence[int]] = None,
           width: Optional[int] = None, window: int = 2000, round: str = "pow10", overwrite: bool = False,
           dpi: int = 150) -> list[Path]:
    """Draw ``figure`` (``4``-``8``, ``corrections`` or ``all``) from ``traces`` into ``out``.

    ``out`` is a file for one figure (its suffix picks the format) and a directory for ``all``
    (``figure5.png``, ...; only the figures the traces can draw). ``steps`` holds the first-N
    iteration counts per trace (default 2000), ``width`` overrides the median filter width (1: off),
    ``window``/``round`` are the corrections chart's distill settings. Existing files are kept
    unless ``overwrite``. Returns the files written.
    """
    out = Path(out)
    if figure != "all":
        if out.is_dir():
            raise GraftlabError(f"{out} is a directory: give a file name for one figure (or --figure all)")
        if not out.suffix:
            raise GraftlabError(f"{out}: give a file name with a suffix (.png, .pdf, .svg)")
        _check_new(out, overwrite)
        fig = draw(traces, figure, steps=steps, width=width, window=window, round=round)
        _save(fig, out, dpi)
        return [out]
    if out.exists() and not out.is_dir():
        raise GraftlabError(f"{out} is a file: --figure all writes into a directory")
    names = applicable(traces[0])
    if len(traces) == 2 and applicable(traces[1]) != names:
        raise GraftlabError("the two traces have different granularities (one global, one per-layer)")
    targets = {f: out / f"{FILENAMES[f]}.png" for f in names}
    for path in targets.values():
        _check_new(path, overwrite)
    written = []
    for f, path in targets.items():
        use = traces[:1] if f in ("4", "5", "corrections") else traces
        _save(draw(use, f, steps=steps[:1] if steps and len(use) == 1 else steps, width=width, window=window,
                   round=round), path, dpi)
        written.append(path)
    return written
