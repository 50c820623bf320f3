"""Distill cost on a long synthetic trace: 100,000 steps x 400 groups (40M rows).

The trace is written in the trace format by the library's own writer (``graftlab.trace``), one part
file per 100 steps as the Recorder writes it, with drifting log-normal ratios, and cached under
``bench/data/`` (rebuilt when missing). Each measurement runs in a fresh process, whose peak RSS
comes from ``os.wait4``; the two things a target compares are interleaved over repeats::

    python bench/distill_cost.py            # 40M-row trace (built once: about a minute, ~200 MB)
    python bench/distill_cost.py --quick    # 4,000 steps x 40 groups

Measured (targets from the design and issue 13):
- ``graftlab distill --window 2000`` on the long trace against the same on a 2000-step trace:
  under 2 s and within 3x (only the first window's parts are read);
- ``graftlab distill --schedule --filter 51`` over the whole trace: under 5x the time of
  ``pyarrow.parquet.read_table`` of the same files, and under 2 GB peak RSS;
- ``read_trace`` of the whole trace: within 1.5x of ``pyarrow.parquet.read_table``.

The whole-trace jobs (schedule, read_trace, read_table) are interleaved, each in a fresh process,
and every ratio is taken within one repeat; ``--slow-repeats`` sets how many.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, quantiles, run_process, table, write_result  # noqa: E402

from graftlab import trace  # noqa: E402

STEPS_PER_PART = 100  # the Recorder's default flush interval


def group_names(n: int) -> list[str]:
    """``n`` BERT-large parameter names (24 blocks, untied MLM decoder, NSP head: 400 in all)."""
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    per_block = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]
    i = 0
    while len(names) < n - 11:
        names += [f"encoder.layer.{i}.{m}.{w}" for m in per_block for w in ("weight", "bias")]
        i += 1
    names += ["pooler.dense.weight", "pooler.dense.bias", "cls.predictions.transform.dense.weight",
              "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
              "cls.predictions.transform.LayerNorm.bias", "cls.predictions.decoder.weight",
              "cls.predictions.decoder.bias", "cls.predictions.bias", "cls.seq_relationship.weight",
              "cls.seq_relationship.bias"]
    return names[:n]


def _metadata(names: list[str], steps: int) -> dict:
    from graftlab.kinds import classify_names, to_dict

    kinds = classify_names(names)
    return {
        "format": trace.FORMAT,
        "granularity": "layer",
        "groups": [{"name": n, **to_dict(kinds[n]), "shape": None, "numel": None, "members": [n]} for n in names],
        "magnitude": {"class": "Adam", "hyperparameters": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8}},
        "direction": {"class": "SGD", "hyperparameters": {"lr": 0.1, "momentum": 0.9}},
        "task": "synthetic", "batch_size": None, "seed": 0, "device": "cpu", "every": 1,
        "flush_every": STEPS_PER_PART, "start_step": 0, "versions": {"graftlab": "bench", "torch": None},
        "config": {"synthetic_steps": steps},
    }


def make_trace(path: Path, steps: int, groups: int, seed: int = 0) -> Path:
    """Write a synthetic ``steps x groups`` trace to ``path`` (a directory) unless it is complete.

    Ratios drift: group g's ratio is ``base_g * (1 + 9 t/T)^-drift_g`` times log-normal noise, with
    ``base_g`` log-uniform over 1e-2..1e1 (the spread of the design's measured traces); every 50th
    group is degenerate (ratio ~1e4) and every 97th step of group 7 has D's step zero (ratio inf).
    """
    stamp = path / ".complete"
    want = {"steps": steps, "groups": groups, "seed": seed, "format": trace.FORMAT}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return path
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    names = group_names(groups)
    meta = _metadata(names, steps)
    trace.write_sidecar(path, meta)
    rng = np.random.default_rng(seed)
    base = 10 ** rng.uniform(-2, 1, groups)
    base[::50] = 1e4
    drift = rng.uniform(0.0, 1.0, groups)
    for first in range(0, steps, STEPS_PER_PART):
        t = np.arange(first, min(first + STEPS_PER_PART, steps))
        n = len(t)
        trend = (1 + 9 * t / steps)[:, None] ** -drift[None, :]
        ratio = base[None, :] * trend * np.exp(rng.normal(0, 0.3, (n, groups)))
        norm_d = np.exp(rng.normal(-3, 0.5, (n, groups)))
        norm_m = ratio * norm_d
        zero = (t % 97 == 0)
        if groups > 7:
            norm_d[zero, 7] = 0.0
            ratio[zero, 7] = np.inf
        stats = np.stack([norm_m, norm_d, ratio], axis=1).astype(np.float32)
        table_ = trace.build_table(t, names, stats, {"lr": np.full(n, 1e-3)}, meta)
        trace.write_part(path, table_)
    stamp.write_text(json.dumps(want))
    return path


IN_PROCESS = False  # --quick runs the jobs in this process: no interpreter starts, RSS not per job


def _run(code: str) -> dict:
    """Run python ``code`` in a fresh process; it prints one JSON line (its seconds and peak RSS)."""
    if IN_PROCESS:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, "<bench job>", "exec"), {"__name__": "bench_job"})
        return json.loads(buf.getvalue().strip().splitlines()[-1])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The child reports its own wall time and CPU time (all its threads; excluding interpreter start and
# imports) and its peak RSS. On a machine shared with other jobs the CPU time is the steadier figure.
_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
{imports}
def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t, c = time.perf_counter(), _cpu()
{body}
dt, dc = time.perf_counter() - t, _cpu() - c
print(json.dumps({{"seconds": dt, "cpu_seconds": dc,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}}))
"""


def _child(imports: str, body: str) -> str:
    return _CHILD.format(root=str(ROOT), imports=imports, body=body)


def distill_job(path: Path, out: Path, *args: str) -> str:
    """The library call ``graftlab distill`` makes, timed in-process (imports excluded)."""
    window = int(args[args.index("--window") + 1])
    schedule = "--schedule" in args
    filt = int(args[args.index("--filter") + 1]) if "--filter" in args else None
    return _child(
        "from graftlab.distill.pipeline import distill\nfrom graftlab.corrections import save",
        f"corr = distill({str(path)!r}, window={window}, schedule={schedule}, filter={filt})\n"
        f"save(corr, {str(out)!r}, overwrite=True)\n"
        "extra = {'groups': len(corr.source['groups'])}",
    )


def cli_wall(path: Path, out: Path, *args: str) -> dict:
    """Wall time and peak RSS of the real command, ``python -m graftlab distill ...``, start to exit."""
    return run_process([sys.executable, "-m", "graftlab", "distill", str(path), "-o", str(out), "--overwrite", *args])


def repeat(fn, repeats: int) -> list[dict]:
    return [fn() for _ in range(repeats)]


def summary(runs: list[dict], key: str = "seconds") -> dict:
    s = quantiles([r[key] for r in runs])
    s["max_rss_mb"] = max(r["max_rss_mb"] for r in runs)
    return s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, help="steps of the long trace (default 100000; quick 4000)")
    ap.add_argument("--groups", type=int, help="groups (default 400; quick 40)")
    ap.add_argument("--window", type=int, help="distill window (default 2000; quick 200)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 5; quick 1)")
    ap.add_argument("--slow-repeats", type=int, default=3,
                    help="interleaved repeats of the whole-trace schedule and reads (default 3)")
    ap.add_argument("--data", type=Path, default=DATA, help="where the synthetic traces are cached")
    args = ap.parse_args(argv)
    steps = args.steps or (4000 if args.quick else 100_000)
    groups = args.groups or (40 if args.quick else 400)
    window = args.window or (200 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 5)
    global IN_PROCESS
    IN_PROCESS = args.quick

    t = time.perf_counter()
    long_path = make_trace(args.data / f"synthetic-{steps}x{groups}", steps, groups)
    short_path = make_trace(args.data / f"synthetic-{window}x{groups}", window, groups)
    built = time.perf_counter() - t
    size = sum(f.stat().st_size for f in long_path.glob(trace.PART_GLOB))
    rows = steps * groups
    print(f"distill cost: trace {steps:,} steps x {groups} groups = {rows:,} rows, {size / 1e6:.0f} MB on disk "
          f"({size / rows:.2f} B/row; ready in {built:.1f} s), window {window}, {repeats} repeats", flush=True)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="graftlab-bench-") as tmp:
        out = Path(tmp) / "corrections.json"
        win = ("--window", str(window), "--static")
        # 1. first-window distill, long trace vs a trace that only holds that window (interleaved)
        lib_long, lib_short, cli_long, cli_short = [], [], [], []
        for r in range(repeats):
            jobs = [(lib_long, lambda: _run(distill_job(long_path, out, *win))),
                    (lib_short, lambda: _run(distill_job(short_path, out, *win))),
                    (cli_long, lambda: cli_wall(long_path, out, *win)),
                    (cli_short, lambda: cli_wall(short_path, out, *win))]
            if args.quick:  # the smoke test checks the library calls; the command adds process starts
                jobs = jobs[:2]
            for sink, job in (jobs if r % 2 == 0 else jobs[::-1]):
                sink.append(job())
        results["window_long"] = summary(lib_long)
        results["window_short"] = summary(lib_short)
        results["window_ratio"] = quantiles([a["seconds"] / b["seconds"] for a, b in zip(lib_long, lib_short)])
        if not args.quick:
            results["cli_window_long"] = summary(cli_long)
            results["cli_window_short"] = summary(cli_short)
            results["cli_window_ratio"] = quantiles([a["seconds"] / b["seconds"] for a, b in zip(cli_long, cli_short)])
        print(f"  window: library {results['window_long']['median']:.2f} s vs {results['window_short']['median']:.2f} s "
              f"on the {window}-step trace", flush=True)

        # 2. whole-trace jobs, interleaved: the schedule with the paper's median filter, read_trace,
        #    and pyarrow's bare read_table of the same files (the baseline of both targets)
        sched = ("--window", str(window), "--schedule", "--filter", "51")
        files = sorted(str(f) for f in long_path.glob(trace.PART_GLOB))
        n_sched = max(1, args.slow_repeats)
        sc, rt, pa_ = [], [], []
        for r in range(n_sched):
            jobs = [(sc, lambda: _run(distill_job(long_path, out, *sched))),
                    (rt, lambda: _run(_child("from graftlab.trace import read_trace",
                                             f"df = read_trace({str(long_path)!r})\nextra = {{'rows': len(df)}}"))),
                    (pa_, lambda: _run(_child("import pyarrow.parquet as pq",
                                              f"tb = pq.read_table({files!r})\nextra = {{'rows': tb.num_rows}}")))]
            for sink, job in (jobs if r % 2 == 0 else jobs[::-1]):
                sink.append(job())
            print(f"  repeat {r + 1}/{n_sched}: schedule {sc[-1]['seconds']:.2f} s ({sc[-1]['max_rss_mb']:.0f} MB), "
                  f"read_trace {rt[-1]['seconds']:.2f} s, read_table {pa_[-1]['seconds']:.2f} s", flush=True)
        results["schedule"] = summary(sc)
        results["read_trace"] = summary(rt)
        results["pyarrow_read_table"] = summary(pa_)
        results["schedule_ratio"] = quantiles([a["seconds"] / b["seconds"] for a, b in zip(sc, pa_)])
        results["read_ratio"] = quantiles([a["seconds"] / b["seconds"] for a, b in zip(rt, pa_)])
        results["schedule_cpu_ratio"] = quantiles([a["cpu_seconds"] / b["cpu_seconds"] for a, b in zip(sc, pa_)])
        results["read_cpu_ratio"] = quantiles([a["cpu_seconds"] / b["cpu_seconds"] for a, b in zip(rt, pa_)])
        assert all(r["rows"] == rows for r in rt + pa_), "a reader returned the wrong number of rows"
        if not args.quick:
            results["cli_schedule"] = summary(repeat(lambda: cli_wall(long_path, out, *sched), 1))

    ok = lambda c: "ok" if c else "MISSED"  # noqa: E731
    w, ws, s = results["window_long"], results["window_short"], results["schedule"]
    nan = {"median": float("nan"), "min": float("nan"), "max": float("nan"), "max_rss_mb": float("nan")}
    cw, cws, cs = (results.get(k, nan) for k in ("cli_window_long", "cli_window_short", "cli_schedule"))
    rt, pt, sr, rr = (results[k] for k in ("read_trace", "pyarrow_read_table", "schedule_ratio", "read_ratio"))
    spread = lambda q: f"{q['min']:.2f}..{q['max']:.2f}"  # noqa: E731
    tab = table(
        ["measurement", "median s", "spread s", "peak RSS MB", "target", "met"],
        [
            [f"distill --window {window}, {steps:,}-step trace (library call)", w["median"], spread(w),
             w["max_rss_mb"], "< 2 s", ok(w["median"] < 2)],
            [f"distill --window {window}, {window}-step trace (library call)", ws["median"], spread(ws),
             ws["max_rss_mb"], "", ""],
            ["ratio long / short trace", f"{results['window_ratio']['median']:.2f}x", spread(results["window_ratio"]),
             "", "<= 3x", ok(results["window_ratio"]["median"] <= 3)],
            [f"`graftlab distill --window {window}` command, long trace (process start to exit)", cw["median"],
             spread(cw), cw["max_rss_mb"], "", ""],
            [f"`graftlab distill --window {window}` command, {window}-step trace", cws["median"],
             "", cws["max_rss_mb"], "", ""],
            ["pyarrow.parquet.read_table(same files): the baseline", pt["median"], spread(pt), pt["max_rss_mb"], "", ""],
            ["distill --schedule --filter 51, whole trace (library call)", s["median"], spread(s), s["max_rss_mb"],
             "< 2048 MB", ok(s["max_rss_mb"] < 2048)],
            ["ratio schedule / read_table (per repeat, wall)", f"{sr['median']:.2f}x", spread(sr), "", "< 5x",
             ok(sr["median"] < 5)],
            ["ratio schedule / read_table (per repeat, process CPU)", f"{results['schedule_cpu_ratio']['median']:.2f}x",
             spread(results["schedule_cpu_ratio"]), "", "", ""],
            ["`graftlab distill --schedule --filter 51` command", cs["median"], "", cs["max_rss_mb"], "", ""],
            ["read_trace(whole trace)", rt["median"], spread(rt), rt["max_rss_mb"], "", ""],
            ["ratio read_trace / read_table (per repeat, wall)", f"{rr['median']:.2f}x", spread(rr), "", "<= 1.5x",
             ok(rr["median"] <= 1.5)],
            ["ratio read_trace / read_table (per repeat, process CPU)", f"{results['read_cpu_ratio']['median']:.2f}x",
             spread(results["read_cpu_ratio"]), "", "", ""],
        ],
    )
    print("\n" + tab)
    payload = {"steps": steps, "groups": groups, "rows": rows, "window": window, "repeats": repeats,
               "slow_repeats": n_sched,
               "trace_bytes": size, "bytes_per_row": size / rows, "results": results, "tables": {"distill": tab}}
    path = write_result("distill_cost", payload, args.quick)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
