"""Render figures to files: what ``graftlab plot`` does.

    from graftlab.plots.render import render
    render(["trace_bs32", "trace_bs128"], "all", "figures/")       # figures/figure5.png, ...
    render(["trace_bs32"], "5", "fig5.png", steps=[2000])
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np

from graftlab.distill.medians import filter_width
from graftlab.errors import GraftlabError
from graftlab.plots.common import PathLike
from graftlab.trace import read_metadata

FIGURES = ("4", "5", "6", "7", "8", "corrections", "rows")
FILENAMES = {"4": "figure4", "5": "figure5", "6": "figure6", "7": "figure7", "8": "figure8",
             "corrections": "corrections", "rows": "rows"}


def applicable(trace: PathLike) -> list[str]:
    """The figures a trace can draw: Figure 4 for a global trace, the per-layer ones otherwise."""
    meta = read_metadata(trace)
    if meta.get("granularity") == "global" or len(meta.get("groups") or []) == 1:
        return ["4"]
    rows = ["rows"] if meta.get("granularity") == "vocab" else []  # per-row ratios against token frequency
    return ["5", "6", "7", "8", "corrections", *rows]


def _steps(steps: Optional[Sequence[int]], n: int, default: int = 2000):
    steps = list(steps or [])
    if len(steps) > n:
        raise GraftlabError(f"got {len(steps)} {{steps}} values for {n} trace(s)", param="steps")
    if any(s <= 0 for s in steps):
        raise GraftlabError(f"{{steps}} must be positive, got {steps}", param="steps")
    return (steps + [steps[-1] if steps else default] * n)[:n]


def _check_width(width: Optional[int]) -> None:
    filter_width(width, "width")


def _check_drawable(trace: PathLike, steps: Optional[int]) -> None:
    """A log-scale figure needs a finite positive ratio in the steps it shows."""
    from graftlab.trace import read_trace

    ratio = read_trace(trace, steps=(None, steps), columns=[])["ratio"].to_numpy(dtype=np.float64)
    if not (np.isfinite(ratio) & (ratio > 0)).any():
        span = f"its first {steps} steps" if steps is not None else "any step"
        raise GraftlabError(f"{trace}: no finite positive ratio in {span} (all NaN, infinite, zero or negative): "
                            "nothing to draw on a log axis")


def draw(traces: Sequence[PathLike], figure: str, *, steps: Optional[Sequence[int]] = None,
         width: Optional[int] = None, window: Optional[int] = None, round: str = "none"):
    """One figure as a matplotlib Figure (see :func:`render` for the arguments)."""
    from graftlab import plots

    traces = list(traces)
    if not 1 <= len(traces) <= 2:
        raise GraftlabError(f"give one or two traces, got {len(traces)}")
    if figure not in FIGURES:
        raise GraftlabError(f"unknown figure {figure!r}: expected one of {', '.join(FIGURES)} or all")
    if figure in ("4", "5", "corrections", "rows") and len(traces) > 1:
        raise GraftlabError(f"figure {figure} draws one trace, got {len(traces)}")
    _check_width(width)
    n = _steps(steps, len(traces))
    if figure != "corrections":  # the chart's distill says what is wrong with a trace itself
        for t, k in zip(traces, n):
            _check_drawable(t, k if figure in ("5", "6", "8") else None)
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
    if figure == "rows":
        return plots.rows_figure(traces[0], steps=n[0])
    from graftlab.trace import trace_extent

    first, last = trace_extent(traces[0])
    # a trace shorter than the window is distilled over all of it
    return plots.corrections_bars(traces[0], window=None if window is None else min(window, last - first + 1), round=round,
                                  filter=width if width and width > 1 else None)


def _formats() -> list[str]:
    from matplotlib.backend_bases import FigureCanvasBase

    # pgf needs a LaTeX installation and eps/ps Ghostscript for some text: refused up front rather
    # than failing half-way through a write
    return [f for f in FigureCanvasBase.get_supported_filetypes() if f not in _NEEDS_TOOLS]


_NEEDS_TOOLS = {"pgf", "eps", "ps"}


def _save(fig, path: Path, dpi: int) -> None:
    from graftlab.io.outputs import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix[1:].lower()))
    finally:
        plt.close(fig)


def render(traces: Sequence[PathLike], figure: str, out: PathLike, *, steps: Optional[Sequence[int]] = None,
           width: Optional[int] = None, window: Optional[int] = None, round: str = "none", overwrite: bool = False,
           dpi: int = 150) -> list[Path]:
    """Draw ``figure`` (``4``-``8``, ``corrections``, ``rows`` (a vocab trace's per-row ratios against
    token frequency) or ``all``) from ``traces`` into ``out``.

    ``out`` is a file for one figure (its suffix picks the format). For ``all`` (only the figures
    the traces can draw) it is a directory (``out/figure5.png``, ...), or an image name whose
    figures go beside it, named after it (``x.png`` -> ``x-figure5.png``, ``x-figure6.png``, ...;
    ``x.png`` itself when one figure applies). ``steps`` holds the first-N
    iteration counts per trace (default 2000), ``width`` overrides the median filter width (1: off),
    ``window``/``round`` are the corrections chart's distill settings. Existing files are kept
    unless ``overwrite``. Every figure is drawn before any file is written, and each file is
    written whole (a temporary name, then a rename). Returns the files written.

    Raises :class:`GraftlabError` for a bad setting, a trace with nothing to draw, or an output that
    exists (without ``overwrite``), has an unknown suffix, is a trace or lies inside a trace folder.
    """
    from graftlab.trace.outputs import check_output

    if not str(out).strip():  # Path("") is the current folder: never a place the user named
        raise GraftlabError("{out} is empty: give a file (one figure) or a folder (--figure all)", param="out")
    out = Path(out)
    inputs = [("trace", t) for t in traces]
    _check_width(width)
    if figure != "all":
        if out.is_dir():
            raise GraftlabError(f"{out} is a directory: give a file name for one figure (or --figure all)")
        if not out.suffix:
            raise GraftlabError(f"{out}: give a file name with a suffix (.png, .pdf, .svg)")
        if out.suffix[1:].lower() not in _formats():
            raise GraftlabError(f"{out}: unknown or unsupported image format {out.suffix!r} (formats that need "
                                f"LaTeX or other tools are not offered): use one of "
                                f"{', '.join('.' + f for f in sorted(_formats()))}")
        check_output(out, "figure file", overwrite=overwrite, inputs=inputs)
        fig = draw(traces, figure, steps=steps, width=width, window=window, round=round)
        _save(fig, out, dpi)
        return [out]
    names = applicable(traces[0])
    if len(traces) == 2 and applicable(traces[1]) != names:
        raise GraftlabError("the two traces have different granularities (one global, one per-layer)")
    if not out.is_dir() and out.suffix[1:].lower() in _formats():
        # an image name for several figures: files beside it that say which figure each is
        # (x.png -> x-figure5.png, ...), never a folder named like an image
        if out.parent != Path("") and not out.parent.is_dir():
            raise GraftlabError(f"{out}: its folder {str(out.parent)!r} does not exist")
        targets = ({names[0]: out} if len(names) == 1 else
                   {f: out.with_name(f"{out.stem}-{FILENAMES[f]}{out.suffix}") for f in names})
    else:
        if out.exists() and not out.is_dir():
            raise GraftlabError(f"{out} is a file: --figure all writes into a directory")
        check_output(out, "figure folder", folder=True, inputs=inputs)
        targets = {f: out / f"{FILENAMES[f]}.png" for f in names}
    for path in targets.values():
        check_output(path, "figure file", overwrite=overwrite, inputs=inputs)
    figures = {}
    try:
        for f in targets:
            use = traces[:1] if f in ("4", "5", "corrections", "rows") else traces
            figures[f] = draw(use, f, steps=steps[:1] if steps and len(use) == 1 else steps, width=width,
                              window=window, round=round)
    except BaseException:
        for fig in figures.values():
            plt.close(fig)
        raise
    written = []
    for f, path in targets.items():
        _save(figures[f], path, dpi)
        written.append(path)
    return written
