"""Run every benchmark, then refresh the tables in ``bench/RESULTS.md`` from their JSON results.

    python bench/run_all.py            # full sizes: ~40 minutes on a busy 2-core machine today
    python bench/run_all.py --quick    # smallest sizes (RESULTS.md is left alone)
    python bench/run_all.py --only step_cost record_cost

Each script runs in its own process (so one's memory does not weigh on the next) and writes
``bench/results/<name>.json``. The hand-written analysis in RESULTS.md sits outside the block
between the ``tables`` markers, which this script rewrites.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, results_dir  # noqa: E402

SCRIPTS = ("step_cost", "record_cost", "divergence_check", "distill_cost", "median_engines", "trace_size", "cli_start",
           "bitflip")
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- tables:begin (bench/run_all.py writes this block) -->", "<!-- tables:end -->"

SECTIONS = {
    "step_cost": ("Step cost: `Graft(M, D).step()` / the strongest `M.step(); D.step()`",
                  ["timing", "baselines", "compile", "record", "memory"]),
    "record_cost": ("Recording cost: bert training steps with / without a Recorder", ["record"]),
    "divergence_check": ("Divergence check cost: bert training steps with / without the per-step check", ["check"]),
    "distill_cost": ("Distill cost on a 100,000-step x 400-group trace (40M rows)", ["distill"]),
    "median_engines": ("Exact per-group medians: engines compared (in memory, no file reading)", ["engines"]),
    "trace_size": ("Trace size on disk, and what not storing `ratio` costs on read", ["size", "lossless", "read"]),
    "cli_start": ("Command start-up against `python -c \"import pandas, pyarrow.parquet\"`", ["cli_start"]),
    "bitflip": ("One flipped bit per part file: caught, harmless, or altered data", ["bitflip"]),
}


STEP_COST_CAPTIONS = {
    "baselines": "The baseline forms, median ms per `M.step(); D.step()` (children without a fused kernel keep "
                 "their foreach form in the fused column):",
    "compile": "One-off cost of the fused path: its first step (inductor compile, fresh cache), per pair; "
               "later pairs with the same optimizer flags reuse the compiled passes:",
    "record": "A fused step with a Recorder (every step; flushes every 50 steps) against the same step without:",
    "memory": "Memory beyond parameters, gradients and both children's states, in parameter-sized buffers (peak "
              "RSS; generic steps include M.step()'s own transients, as the baseline does; fused: a step after "
              "the compile):",
}


def tables_block() -> str:
    out = [BEGIN, ""]
    m = None
    for name, (title, keys) in SECTIONS.items():
        path = results_dir() / f"{name}.json"
        if not path.exists():
            out += [f"### {title}", "", "not measured (no bench/results/{name}.json)", ""]
            continue
        res = json.loads(path.read_text())
        m = m or res.get("machine")
        # results carry their own time; older ones only the file's (which a checkout resets)
        when = res.get("written") or time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        out += [f"### {title}", "", f"`{res.get('command', '')}` ({when}; load average at start "
                f"{', '.join(f'{x:.1f}' for x in res['machine'].get('load_avg') or [])})", ""]
        notes = {
            "step_cost": f"{res.get('parameters', 0) / 1e6:.1f}M parameters in {res.get('tensors')} tensors, "
                         f"{res.get('device')}, {res.get('threads')} torch thread(s), {res.get('repeats')} "
                         f"interleaved repeats x {res.get('steps_per_block')} steps; ratio clock: "
                         f"{(res.get('timing') or [{}])[0].get('clock', '?')}.",
            "record_cost": f"{res.get('repeats')} interleaved repeats x {res.get('block')} steps.",
            "divergence_check": f"{res.get('repeats')} interleaved repeats x {res.get('block')} steps, batch "
                                f"{res.get('batch_size')}, {res.get('device')}; ratio clock: {res.get('clock')}.",
            "distill_cost": f"{res.get('trace_bytes', 0) / 1e6:.0f} MB on disk ({res.get('bytes_per_row', 0):.2f} "
                            f"bytes/row); {res.get('repeats')} interleaved repeats of the window distills, "
                            f"{res.get('slow_repeats', 3)} of the whole-trace schedule and reads, 1 of the schedule "
                            "command; each in a fresh process.",
        }
        notes["median_engines"] = (f"{res.get('steps', 0):,} steps x {res.get('groups')} groups, median of "
                                   f"{res.get('repeats')} interleaved repeats; window 2000, filter width 51.")
        if name in notes:
            out += [notes[name], ""]
        for k in keys:
            tab = (res.get("tables") or {}).get(k)
            if tab:
                if name == "step_cost" and k in STEP_COST_CAPTIONS:
                    out += [STEP_COST_CAPTIONS[k], ""]
                out += [tab, ""]
    if m:
        out += [f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores, Python {m.get('python')}, torch "
                f"{m.get('torch')}; GPU: {m.get('cuda') or 'none (GPU rows not measured)'}.", ""]
    out.append(END)
    return "\n".join(out)


def write_results_md() -> None:
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else f"# Benchmark results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    RESULTS_MD.write_text(head + tables_block() + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=SCRIPTS)
    ap.add_argument("--tables-only", action="store_true", help="rewrite RESULTS.md from existing results")
    args = ap.parse_args(argv)
    if not args.tables_only:
        print(f"machine: {machine()}", flush=True)
        for name in args.only or SCRIPTS:
            cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py")] + (["--quick"] if args.quick else [])
            print(f"\n=== {' '.join(cmd[1:])}", flush=True)
            start = time.perf_counter()
            rc = subprocess.call(cmd, cwd=ROOT)
            print(f"=== {name}: exit {rc}, {time.perf_counter() - start:.0f} s", flush=True)
            if rc != 0:
                return rc
    if not args.quick:
        write_results_md()
        print(f"\nrefreshed the tables in {RESULTS_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
