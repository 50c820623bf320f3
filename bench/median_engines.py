"""Which engine for exact per-group medians over tens of millions of trace rows?

The two operations ``distill --schedule --filter 51`` needs, on a synthetic ``steps x 400`` trace
(log-normal ratios, 1 in 200 not finite), each engine fed from memory (no file reading):

- window medians: the median of each group's finite ratios over consecutive 2000-step windows;
- the median filter: each group's centred running median of width 51, skipping non-finite values,
  the window shrinking at the ends.

Engines: pandas (group-by median; rolling median of the steps x groups frame), Polars
(``group_by().median()``, ``rolling_median().over()``), DuckDB (``median()``; ``median() OVER``
a 51-row frame), Arrow compute (its only grouped median is the approximate t-digest), and the
``(groups, steps)`` grid of ``graftlab.distill.medians`` (``bottleneck.nanmedian`` per window block,
``bottleneck.move_median`` per group). Each result is compared with the exact float64 medians
(max relative difference; 0 means identical)::

    python bench/median_engines.py               # 25,000 steps x 400 groups (10M rows)
    python bench/median_engines.py --steps 100000
    python bench/median_engines.py --quick       # 2,000 steps x 40 groups
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import quantiles, table, write_result  # noqa: E402

from graftlab.distill import medians  # noqa: E402

WINDOW, WIDTH = 2000, 51


def data(steps: int, groups: int):
    rng = np.random.default_rng(0)
    ratio = ((10 ** rng.uniform(-2, 1, groups))[None, :] * np.exp(rng.normal(0, 0.3, (steps, groups))))
    ratio[rng.random(ratio.shape) < 0.005] = np.inf
    ratio = ratio.astype(np.float32)
    step = np.repeat(np.arange(steps), groups)
    code = np.tile(np.arange(groups, dtype=np.int32), steps)
    return step, code, ratio.reshape(-1)


def rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64).reshape(want.shape).copy(), want
    got[np.isnan(want) & np.isfinite(got)] = np.nan  # the filter keeps non-finite positions NaN, as distill does
    if not np.array_equal(np.isnan(got), np.isnan(want)):
        return float("inf")
    ok = ~np.isnan(want)
    return float(np.max(np.abs(got[ok] - want[ok]) / np.abs(want[ok]))) if ok.any() else 0.0


def engines(step, code, ratio, groups: int):
    """name -> (window medians (W, G) builder, running median (G, S) builder or None)."""
    n_steps = len(step) // groups
    win = (step // WINDOW).astype(np.int64)
    finite64 = np.where(np.isfinite(ratio), ratio, np.nan).astype(np.float64)
    out: dict[str, tuple[Callable, Optional[Callable]]] = {}

    def grid_windows():
        g = medians.grid(step, code, ratio, [str(i) for i in range(groups)])
        return g.windows(WINDOW)[1]

    def grid_filter():
        g = medians.grid(step, code, ratio, [str(i) for i in range(groups)])
        return g.filtered(WIDTH).values

    out["graftlab grid (bottleneck)"] = (grid_windows, grid_filter)

    import pandas as pd

    def pd_windows():
        frame = pd.DataFrame({"k": win * groups + code, "r": finite64})
        return frame.groupby("k", sort=True)["r"].median().to_numpy().reshape(-1, groups)

    def pd_filter():
        wide = pd.DataFrame(finite64.reshape(n_steps, groups))
        return wide.rolling(WIDTH, center=True, min_periods=1).median().to_numpy().T

    out["pandas"] = (pd_windows, pd_filter)
    try:
        import polars as pl

        # NaN is a value to Polars and DuckDB (sorted above everything): non-finite ratios go in as nulls
        frame = pl.DataFrame({"step": step, "group": code, "ratio": pl.Series(finite64, nan_to_null=True)})

        def pl_windows():
            res = (frame.with_columns((pl.col("step") // WINDOW).alias("w"))
                   .group_by("w", "group").agg(pl.col("ratio").median()).sort("w", "group"))
            return res["ratio"].to_numpy().reshape(-1, groups)

        def pl_filter():
            res = frame.select(pl.col("ratio").rolling_median(WIDTH, min_samples=1, center=True).over("group"))
            return res["ratio"].to_numpy().reshape(n_steps, groups).T

        out[f"polars {pl.__version__}"] = (pl_windows, pl_filter)
    except ImportError:
        pass
    try:
        import duckdb
        import pyarrow as pa

        con = duckdb.connect()
        con.execute(f"SET threads={os.cpu_count() or 1}")
        tb = pa.table({"step": step, "grp": code, "ratio": pa.array(finite64, from_pandas=True)})
        con.register("tb", tb)

        def dd_windows():
            res = con.execute(f"SELECT step // {WINDOW} AS w, grp, median(ratio) AS m FROM tb "
                              "GROUP BY ALL ORDER BY w, grp").fetchnumpy()
            return np.asarray(res["m"], np.float64).reshape(-1, groups)

        def dd_filter():
            h = WIDTH // 2
            res = con.execute(f"SELECT median(ratio) OVER (PARTITION BY grp ORDER BY step ROWS BETWEEN {h} "
                              f"PRECEDING AND {h} FOLLOWING) AS m, step, grp FROM tb ORDER BY step, grp").fetchnumpy()
            return np.asarray(res["m"], np.float64).reshape(n_steps, groups).T

        out[f"duckdb {duckdb.__version__}"] = (dd_windows, dd_filter)
    except ImportError:
        pass
    import pyarrow as pa

    def arrow_windows():
        tb = pa.table({"w": win, "g": code, "r": finite64})
        res = tb.group_by(["w", "g"]).aggregate([("r", "approximate_median")]).sort_by([("w", "ascending"),
                                                                                          ("g", "ascending")])
        return res.column("r_approximate_median").to_numpy().reshape(-1, groups)

    out["arrow compute (t-digest)"] = (arrow_windows, None)
    return out


def reference(step, code, ratio, groups: int):
    n_steps = len(step) // groups
    r = np.where(np.isfinite(ratio), ratio, np.nan).astype(np.float64).reshape(n_steps, groups)
    n_win = (n_steps + WINDOW - 1) // WINDOW
    wmed = np.array([np.nanmedian(r[k * WINDOW:(k + 1) * WINDOW], axis=0) for k in range(n_win)])
    return wmed


def reference_filter(step, code, ratio, groups: int, width: int = WIDTH) -> np.ndarray:
    """(G, S) float64 running medians by definition, no library engine: at step i the median
    (``numpy.nanmedian``) of the finite ratios among steps ``i - width//2 .. i + width//2`` that
    exist; NaN where the ratio itself is not finite (as distill keeps them)."""
    n_steps, h = len(step) // groups, width // 2
    r = np.where(np.isfinite(ratio), ratio, np.nan).astype(np.float64).reshape(n_steps, groups).T
    out = np.empty_like(r)
    for g in range(groups):  # one row at a time: the (S, width) view of all groups would be GBs
        padded = np.concatenate([np.full(h, np.nan), r[g], np.full(h, np.nan)])
        out[g] = np.nanmedian(np.lib.stride_tricks.sliding_window_view(padded, width), axis=1)
    out[np.isnan(r)] = np.nan
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, help="steps (default 25000; quick 2000)")
    ap.add_argument("--groups", type=int, help="groups (default 400; quick 40)")
    ap.add_argument("--repeats", type=int, help="repeats per engine, interleaved (default 2; quick 1)")
    args = ap.parse_args(argv)
    steps = args.steps or (2000 if args.quick else 25_000)
    groups = args.groups or (40 if args.quick else 400)
    repeats = args.repeats or (1 if args.quick else 2)
    step, code, ratio = data(steps, groups)
    want_windows = reference(step, code, ratio, groups)
    want_filter = reference_filter(step, code, ratio, groups)
    found = engines(step, code, ratio, groups)
    times: dict[str, dict[str, list[float]]] = {k: {"windows": [], "filter": []} for k in found}
    diffs: dict[str, dict[str, float]] = {k: {} for k in found}
    for r in range(repeats):
        for name in (list(found) if r % 2 == 0 else list(found)[::-1]):
            for op, fn in zip(("windows", "filter"), found[name]):
                if fn is None:
                    continue
                t = time.perf_counter()
                got = fn()
                times[name][op].append(time.perf_counter() - t)
                diffs[name][op] = rel_diff(got, want_windows if op == "windows" else want_filter)
            print(f"  {name}: " + ", ".join(f"{op} {v[-1]:.2f} s" for op, v in times[name].items() if v), flush=True)
    rows, results = [], {}
    for name in found:
        w, f = times[name]["windows"], times[name]["filter"]
        results[name] = {"windows": quantiles(w) if w else None, "filter": quantiles(f) if f else None,
                         "max_rel_diff": diffs[name]}
        rows.append([name, quantiles(w)["median"] if w else "-", diffs[name].get("windows", "-"),
                     quantiles(f)["median"] if f else "-", diffs[name].get("filter", "n/a (no such operation)")])
    tab = table(["engine", "window medians s", "max rel. diff", "median filter 51 s", "max rel. diff"], rows)
    print(f"\n{steps:,} steps x {groups} groups = {steps * groups:,} rows; {repeats} repeats (median)\n")
    print(tab)
    path = write_result("median_engines", {"steps": steps, "groups": groups, "repeats": repeats,
                                           "results": results, "tables": {"engines": tab}}, args.quick)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
