"""Analysis at any shape: a long table another tool wrote, and traces of very many groups.

Two shapes, each timed through the command line in fresh processes (wall and process CPU seconds,
peak RSS from ``os.wait4``) and compared within the same run:

- long: a plain Parquet file as pyarrow writes it (one file, row groups of 1000 steps, ``group``
  dictionary-encoded, ``step, group, norm_m, norm_d, ratio``, no graftlab metadata), 100,000 steps x
  400 groups. ``graftlab distill F --window 2000`` against the same on a 2,000-step file (targets:
  under 2 s and within 3x); ``graftlab distill F --schedule --window 2000 --filter 51`` against
  ``pyarrow.parquet.read_table`` of the same file (targets: within 5x and under 2 GB);
- many groups: 100,000 groups x 20 steps (row-sliced BERT names, ``name[i]``) through ``info``,
  ``distill`` and ``plot --figure 5``, each against the same command on 1,000 groups x 20 steps
  (target: at most 15 s and 2 GB each); ``--million`` adds 1,000,000 groups x 1 step (at most 60 s).

The tables are generated under ``--data`` (default: a folder in the system's temporary directory,
never in the repository) and kept for the next run::

    python bench/foreign_scale.py              # both shapes at full size (a few minutes)
    python bench/foreign_scale.py --quick      # 4,000 steps x 40 groups; 2,000 groups
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import quantiles, run_process, table, write_result  # noqa: E402
from distill_cost import group_names  # noqa: E402

ROW_GROUP_STEPS = 1000


def names(groups: int) -> list[str]:
    """``groups`` names: BERT-large's 400 parameters, then row slices of them (``name[i]``)."""
    if groups <= 400:
        return group_names(groups)
    base = group_names(400)
    return [f"{b}[{r}]" for r in range(-(-groups // 400)) for b in base][:groups]


def write_table(path: Path, steps: int, groups: int, seed: int = 0) -> Path:
    """A foreign Parquet table of ``steps`` x ``groups`` (unless one is there), as pyarrow writes it."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    level = rng.lognormal(0, 1, groups).astype(np.float32)
    schema = pa.schema([("step", pa.int64()), ("group", pa.dictionary(pa.int32(), pa.string())),
                        ("norm_m", pa.float32()), ("norm_d", pa.float32()), ("ratio", pa.float32())])
    dictionary = pa.array(names(groups))
    tmp = path.with_name(path.name + ".tmp")
    rows = max(1, min(ROW_GROUP_STEPS, steps))
    with pq.ParquetWriter(tmp, schema) as w:
        for first in range(0, steps, rows):
            n = min(rows, steps - first)
            norm_d = rng.lognormal(0, 0.3, n * groups).astype(np.float32)
            norm_m = norm_d * np.tile(level, n) * rng.lognormal(0, 0.2, n * groups).astype(np.float32)
            code = pa.array(np.tile(np.arange(groups, dtype=np.int32), n))
            w.write_table(pa.table({"step": np.repeat(np.arange(first, first + n), groups),
                                    "group": pa.DictionaryArray.from_arrays(code, dictionary),
                                    "norm_m": norm_m, "norm_d": norm_d, "ratio": norm_m / norm_d}, schema=schema),
                          row_group_size=n * groups)
    tmp.rename(path)
    return path


def graftlab(*args: str) -> dict:
    return run_process([sys.executable, "-m", "graftlab", *map(str, args)])


def read_table(path: Path) -> dict:
    return run_process([sys.executable, "-c", f"import pyarrow.parquet as pq; pq.read_table({str(path)!r})"])


def pair(long, short, repeats: int) -> tuple[dict, dict, dict]:
    """``long`` and ``short`` alternated over ``repeats`` (ABBA), summarised, and their per-repeat ratio."""
    a, b = [], []
    for r in range(repeats):
        for fn, out in ((long, a), (short, b)) if r % 2 == 0 else ((short, b), (long, a)):
            out.append(fn())
    return summary(a), summary(b), quantiles([x["seconds"] / y["seconds"] for x, y in zip(a, b)])


def summary(runs: list[dict]) -> dict:
    s = quantiles([r["seconds"] for r in runs])
    s["cpu_seconds"] = quantiles([r["cpu_seconds"] for r in runs])["median"]
    s["max_rss_mb"] = max(r["max_rss_mb"] for r in runs)
    return s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--million", action="store_true", help="also 1,000,000 groups x 1 step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "graftlab-bench-foreign")
    args = ap.parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    out = args.data / "c.json"
    steps, groups, window, short_steps = (4000, 40, 200, 200) if args.quick else (100_000, 400, 2000, 2000)
    many, few = (2000, 100) if args.quick else (100_000, 1000)
    long_path = write_table(args.data / f"long_{steps}x{groups}.parquet", steps, groups)
    short_path = write_table(args.data / f"long_{short_steps}x{groups}.parquet", short_steps, groups)
    results: dict = {}

    w = ("distill", "--window", window, "-o", out, "--overwrite")
    results["window_long"], results["window_short"], results["window_ratio"] = pair(
        lambda: graftlab(w[0], long_path, *w[1:]), lambda: graftlab(w[0], short_path, *w[1:]), args.repeats)
    sched = ("--schedule", "--window", window, "--filter", 51, "-o", out, "--overwrite")
    results["schedule"], results["read_table"], results["schedule_ratio"] = pair(
        lambda: graftlab("distill", long_path, *sched), lambda: read_table(long_path), args.repeats)

    many_path = write_table(args.data / f"groups_20x{many}.parquet", 20, many)
    few_path = write_table(args.data / f"groups_20x{few}.parquet", 20, few)
    commands = {"info": ("info",), "distill": ("distill", "-o", out, "--overwrite"),
                "plot5": ("plot", "--figure", "5", "-o", args.data / "f5.png", "--overwrite")}
    for name, cmd in commands.items():
        results[f"{name}_many"], results[f"{name}_few"], results[f"{name}_ratio"] = pair(
            lambda: graftlab(cmd[0], many_path, *cmd[1:]), lambda: graftlab(cmd[0], few_path, *cmd[1:]),
            max(1, args.repeats - 2))
    if args.million:
        million = write_table(args.data / "groups_1x1000000.parquet", 1, 1_000_000)
        for name, cmd in commands.items():
            results[f"{name}_million"] = summary([graftlab(cmd[0], million, *cmd[1:])])

    def row(label, key, target=""):
        r = results[key]
        return [label, f"{r['median']:.2f} s", f"{r['cpu_seconds']:.2f} s", f"{r['max_rss_mb']:.0f} MB", target]

    rows = [row(f"distill --window {window}, {steps} steps x {groups} groups", "window_long", "< 2 s"),
            row(f"the same on {short_steps} steps", "window_short"),
            ["ratio long / short", f"{results['window_ratio']['median']:.2f}x", "", "", "<= 3x"],
            row("distill --schedule --filter 51, whole file", "schedule", "< 2 GB"),
            row("pyarrow read_table of the file", "read_table"),
            ["ratio schedule / read_table", f"{results['schedule_ratio']['median']:.2f}x", "", "", "<= 5x"]]
    for name in commands:
        rows += [row(f"{name}, {many} groups x 20 steps", f"{name}_many", "<= 15 s, 2 GB"),
                 row(f"{name}, {few} groups x 20 steps", f"{name}_few"),
                 [f"ratio {name} many / few groups", f"{results[f'{name}_ratio']['median']:.2f}x", "", "", ""]]
        if args.million:
            rows.append(row(f"{name}, 1,000,000 groups x 1 step", f"{name}_million", "<= 60 s"))
    print(table(["what", "wall (median)", "process CPU", "peak RSS", "target"], rows))
    payload = {"steps": steps, "groups": groups, "window": window, "short_steps": short_steps,
               "many_groups": many, "few_groups": few, "repeats": args.repeats,
               "long_bytes": long_path.stat().st_size, "results": results}
    path = write_result("foreign_scale", payload, args.quick)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
