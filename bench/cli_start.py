"""Command start-up: commands that do not train, against importing pandas and pyarrow.

Each command runs as a fresh process, start to exit (wall clock and process CPU time), interleaved
with the baseline ``python -c "import pandas, pyarrow.parquet"`` and, for scale, ``python -c pass``
(the interpreter alone) and ``python -c "import torch"`` (what a command that trains pays first);
every ratio is the median over repeats of the per-repeat ratio, against the baseline and against
``python -c pass`` (so the load of the run is measured, not assumed)::

    python bench/cli_start.py             # 9 repeats
    python bench/cli_start.py --quick     # 2 repeats

Target: ``graftlab info`` and ``graftlab distill --window 500`` on
``sample_traces/bert-adam-sgd-bs16`` under 1 s wall, and none of them imports torch (checked here
too). The wall figure depends on the machine's load; the ratios to ``python -c pass`` and to the
baseline, measured in the same run, are the figures that carry over.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, quantiles, run_process, table, write_result  # noqa: E402

SAMPLE = ROOT / "sample_traces" / "bert-adam-sgd-bs16"
BIN = Path(sys.executable).parent


def timed(cmd: list[str]) -> dict:
    run = run_process(cmd)
    return {"seconds": run["seconds"], "cpu_seconds": run["cpu_seconds"]}


def imports_torch(args: list[str]) -> bool:
    code = ("import sys\nsys.argv = ['graftlab', *%r]\nfrom graftlab.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)" % (args,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip().splitlines()[-1] == "True"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 9; quick 2)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 9)
    graftlab = str(BIN / "graftlab")
    with tempfile.TemporaryDirectory(prefix="graftlab-bench-") as tmp:
        commands = {
            "baseline": [sys.executable, "-c", "import pandas, pyarrow.parquet"],
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c \"import torch\"": [sys.executable, "-c", "import torch"],
            "graftlab --help": [graftlab, "--help"],
            "graftlab info": [graftlab, "info", str(SAMPLE)],
            "graftlab distill --window 500": [graftlab, "distill", str(SAMPLE), "--window", "500", "-o",
                                              f"{tmp}/c.json", "--overwrite"],
        }
        runs: dict[str, list[dict]] = {k: [] for k in commands}
        for r in range(repeats):
            for name in (list(commands) if r % 2 == 0 else list(commands)[::-1]):
                runs[name].append(timed(commands[name]))
        torch = {name: imports_torch(cmd[1:]) for name, cmd in commands.items() if name.startswith("graftlab")}
    rows, results = [], {}
    base, bare = runs["baseline"], runs["python -c pass"]
    for name, rs in runs.items():
        wall = quantiles([x["seconds"] for x in rs])
        cpu = quantiles([x["cpu_seconds"] for x in rs])
        ratio = quantiles([x["seconds"] / b["seconds"] for x, b in zip(rs, base)])
        cpu_ratio = quantiles([x["cpu_seconds"] / b["cpu_seconds"] for x, b in zip(rs, base)])
        to_python = quantiles([x["seconds"] / b["seconds"] for x, b in zip(rs, bare)])
        results[name] = {"wall": wall, "cpu": cpu, "ratio": ratio, "cpu_ratio": cpu_ratio,
                         "ratio_to_python": to_python, "imports_torch": torch.get(name)}
        rows.append([name, wall["median"], f"{wall['min']:.2f}..{wall['max']:.2f}", cpu["median"],
                     f"{ratio['median']:.2f}x", f"{ratio['min']:.2f}..{ratio['max']:.2f}",
                     f"{cpu_ratio['median']:.2f}x", f"{to_python['median']:.2f}x",
                     ("yes" if torch[name] else "no") if name in torch else "-"])
    tab = table(["command", "wall s (median)", "spread s", "CPU s", "wall ratio", "spread", "CPU ratio",
                 "wall / python -c pass", "imports torch"], rows)
    print(tab)
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f}; target: info and distill under 1 s, no torch")
    path = write_result("cli_start", {"repeats": repeats, "results": results, "tables": {"cli_start": tab}},
                        args.quick)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
