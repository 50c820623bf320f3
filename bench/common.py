"""Shared helpers for the benchmark scripts: interleaved timing, robust summaries, result files.

Every benchmark compares a candidate with a baseline measured in the same process. Blocks of the
two alternate (ABBA order, so drift and a busy neighbour hit both alike), and the figure reported
is the median over repeats of the per-repeat ratio, with its spread (min..max and interquartile)::

    res = interleave({"base": run_base, "cand": run_cand}, repeats=7)
    summary = ratio_summary(res["cand"], res["base"])
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / "bench" / "data"

if str(ROOT) not in sys.path:  # `python bench/x.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))


def interleave(blocks: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each block ``repeats`` times, alternating the order every repeat (ABBA...).

    Each block returns its own measured seconds (so set-up inside a block is not timed).
    """
    names = list(blocks)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            out[n].append(blocks[n]())
    return out


def quantiles(xs: Sequence[float]) -> dict[str, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return {"median": xs[0], "min": xs[0], "max": xs[0], "q1": xs[0], "q3": xs[0]}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q[0], "q3": q[2]}


def ratio_summary(cand: Sequence[float], base: Sequence[float]) -> dict[str, float]:
    """Per-repeat ratios cand/base (paired by repeat), summarised."""
    ratios = [c / b for c, b in zip(cand, base)]
    s = quantiles(ratios)
    s["ratios"] = ratios
    return s


def machine() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def results_dir() -> Path:
    """``bench/results``, or ``$GRAFTLAB_BENCH_RESULTS`` (the smoke test writes to a temporary folder)."""
    return Path(os.environ.get("GRAFTLAB_BENCH_RESULTS") or RESULTS)


def command() -> str:
    """The command line that ran, the script named from the repository root (as the tables quote it)."""
    script = Path(sys.argv[0]).resolve()
    first = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]
    return " ".join([first, *sys.argv[1:]])


def write_result(name: str, payload: dict, quick: bool) -> Path:
    """Write ``<results>/<name>.json`` (``<name>.quick.json`` for --quick runs)."""
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}{'.quick' if quick else ''}.json"
    payload = {"benchmark": name, "quick": quick, "machine": machine(), "command": command(),
               "written": time.strftime("%Y-%m-%d %H:%M"), **payload}
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(x: object) -> object:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (printed to the console and pasted into RESULTS.md as is)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1000 else f"{c:,.0f}"
    return str(c)


def timer() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def run_process(cmd: list[str]) -> dict:
    """Run ``cmd`` from the repository root to its exit: wall seconds, process CPU seconds and peak
    RSS (MB, from ``os.wait4``); RuntimeError with its stderr when it fails."""
    import subprocess

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                            env=dict(os.environ, COLUMNS="200"))
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{err}")
    return {"seconds": wall, "cpu_seconds": rusage.ru_utime + rusage.ru_stime, "max_rss_mb": rusage.ru_maxrss / 1024}


def stepper(task, model, optimizer, batches) -> Callable:
    """``step(rec=None)``: one training step of ``model`` on ``batches`` in a cycle, logging the loss
    to the Recorder ``rec`` when given (the same step every recording benchmark times)."""
    state = {"i": 0}

    def step(rec=None) -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if rec is not None:
            rec.log(loss=loss.detach())

    return step
