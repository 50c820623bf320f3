"""Run every benchmark and the reliability suites' counts, then write the result tables.

    python bench/run_all.py            # full sizes: ~40 minutes on a busy 2-core machine, more for the suites
    python bench/run_all.py --quick    # smallest sizes, results as <name>.quick.json (tables left alone)
    python bench/run_all.py --only step_cost record_cost kill_suite

Each script runs in its own process (so one's memory does not weigh on the next) and writes
``bench/results/<name>.json``; each suite is a pytest run with ``GRAFTLAB_RESULTS=bench/results``,
which writes the counts the README's reliability table quotes (kills, cases passed, fuzz examples
run). ``bench/report.py`` then rewrites the tables of README.md and bench/RESULTS.md from them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
from common import ROOT, machine  # noqa: E402

# result name -> the script and its arguments
RUNS = {name: (name, []) for name in ("step_cost", "record_cost", "divergence_check", "distill_cost", "median_engines",
                                      "trace_size", "cli_start", "bitflip")}
RUNS["foreign_scale"] = ("foreign_scale", ["--million"])
RUNS["slice_record_cost.interleaved"] = ("slice_record_cost", ["--every", "10,50,100"])
RUNS["slice_record_cost"] = ("slice_record_cost", ["--hooks-only", "--every", "10,50,100"])
SCRIPTS = tuple(RUNS)
# suite -> (pytest arguments, environment): the full forms of what `make test` runs reduced
SUITES = {
    "kill_suite": (["tests/runs/test_kill.py"], {"GRAFTLAB_KILL_POINTS": "all"}),
    "bad_inputs": (["tests/cli/test_bad_inputs.py"], {}),
    "fuzz": (["tests/cli/test_bad_inputs_fuzz.py"], {"GRAFTLAB_FUZZ": "full"}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=SCRIPTS + tuple(SUITES))
    ap.add_argument("--tables-only", action="store_true", help="rewrite the tables from the existing results")
    args = ap.parse_args(argv)
    if not args.tables_only:
        print(f"machine: {machine()}", flush=True)
        for name in args.only or SCRIPTS + tuple(SUITES):
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if name in SUITES:
                if args.quick:
                    continue  # `make test` runs their reduced forms
                tests, extra = SUITES[name]
                cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
                env.update(extra, GRAFTLAB_RESULTS=str(ROOT / "bench" / "results"))
            else:
                script, extra_args = RUNS[name]
                cmd = [sys.executable, str(ROOT / "bench" / f"{script}.py"), *extra_args] + (["--quick"] if args.quick else [])
            print(f"\n=== {' '.join(cmd[1:])}", flush=True)
            start = time.perf_counter()
            rc = subprocess.call(cmd, cwd=ROOT, env=env)
            print(f"=== {name}: exit {rc}, {time.perf_counter() - start:.0f} s", flush=True)
            if rc != 0:
                return rc
    if not args.quick:
        return report.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
