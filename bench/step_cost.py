"""Step cost of grafting: ``Graft(M, D).step()`` against ``M.step(); D.step()`` on the same parameters.

For Adam#SGD, SGD#AdaGrad and AdamW#SGD, global and layer granularity, direct and generic paths, on
a BERT-style parameter layout (~26M parameters on CPU, BERT-base's 110M on a GPU). Baseline and
candidate blocks alternate, and the reported figure is the median over repeats of the per-repeat
time ratio, with its spread. A second part measures the peak memory a grafted step needs beyond
the parameters, gradients and the two children's states, in units of one parameter-sized buffer::

    python bench/step_cost.py              # full size (a few minutes on 2 CPU cores)
    python bench/step_cost.py --quick      # tiny layout, seconds (the smoke test)

Target: direct path at most 1.25x the baseline; at most one parameter-sized buffer extra.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, quantiles, ratio_summary, table, write_result  # noqa: E402
from layouts import PRESETS, bert_shapes, make_params, numel  # noqa: E402

from graftlab import Graft  # noqa: E402

TARGET_RATIO = 1.25
TARGET_BUFFERS = 1.0


def _pairs():
    """name -> (make_M, make_D); hyperparameters typical of the paper's experiments."""
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
    return {
        "Adam#SGD": (lambda ps: torch.optim.Adam(ps, lr=1e-3), sgd),
        "SGD#AdaGrad": (sgd, lambda ps: torch.optim.Adagrad(ps, lr=0.01)),
        "AdamW#SGD": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01), sgd),
    }


GRANULARITIES = ("global", "layer")
PATHS = ("direct", "generic")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _block(fn, steps: int, device: str):
    """A timed block of ``steps`` calls: returns (wall seconds, process CPU seconds) per call."""

    def run() -> tuple[float, float]:
        _sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            fn()
        _sync(device)
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps

    return run


def time_configs(named, device, repeats, steps, pairs=None, grans=GRANULARITIES, paths=PATHS):
    params = [p for _, p in named]
    rows = []
    for pair, (make_m, make_d) in _pairs().items():
        if pairs and pair not in pairs:
            continue
        base_m, base_d = make_m(params), make_d(params)

        def base_step(m=base_m, d=base_d):
            m.step()
            d.step()

        for _ in range(2):  # allocate the baseline's state before timing
            base_step()
        for gran in grans:
            for path in paths:
                make_m_, make_d_ = make_m, make_d
                graft = Graft(make_m_(params), make_d_(params), granularity=gran, names=named, path=path)
                assert graft.path == path
                for _ in range(2):
                    graft.step()
                res = interleave(
                    {"base": _block(base_step, steps, device), "graft": _block(graft.step, steps, device)}, repeats
                )
                # CPU: process CPU time at one thread is the work done, whatever the neighbours do;
                # GPU: wall time with a synchronisation at the block's ends.
                k = 1 if device == "cpu" else 0
                base_t, graft_t = [t[k] for t in res["base"]], [t[k] for t in res["graft"]]
                s = ratio_summary(graft_t, base_t)
                wall = ratio_summary([t[0] for t in res["graft"]], [t[0] for t in res["base"]])
                rows.append(
                    {
                        "pair": pair,
                        "granularity": gran,
                        "path": path,
                        "groups": len(graft.group_names),
                        "clock": "process CPU time" if k else "wall",
                        "base_ms": quantiles(base_t)["median"] * 1e3,
                        "graft_ms": quantiles(graft_t)["median"] * 1e3,
                        "ratio": s,
                        "wall_ratio": wall,
                        "meets_target": path != "direct" or s["median"] <= TARGET_RATIO,
                    }
                )
                print(
                    f"  {pair:12s} {gran:7s} {path:8s} ratio {s['median']:.3f} "
                    f"[{s['min']:.3f}..{s['max']:.3f}]  wall {wall['median']:.3f} [{wall['min']:.2f}..{wall['max']:.2f}]",
                    flush=True,
                )
                del graft
    return rows


# -- memory ---------------------------------------------------------------------------------------
def _rss_kb() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return rss, hwm


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS


def _measure(fn, device: str) -> tuple[int, int]:
    """(peak bytes above the start during fn, bytes still held after fn)."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start
    start, _ = _rss_kb()
    _reset_peak()
    fn()
    end, hwm = _rss_kb()
    return (hwm - start) * 1024, (end - start) * 1024


def memory_probe(layout: str, device: str, pair: str, gran: str, path: str) -> dict:
    """One configuration in a fresh process: baseline step peak, then the grafted steps' peaks."""
    torch.set_num_threads(1)
    named = make_params(bert_shapes(**PRESETS[layout]), device=device)
    params = [p for _, p in named]
    unit = sum(p.numel() * p.element_size() for p in params)
    make_m, make_d = _pairs()[pair]
    m, d = make_m(params), make_d(params)
    for _ in range(2):  # the children's states exist before anything is measured
        m.step()
        d.step()
    base_peak, _ = _measure(lambda: (m.step(), d.step()), device)
    graft = Graft(m, d, granularity=gran, names=named, path=path)
    first_peak, held = _measure(graft.step, device)
    steady_peak, _ = _measure(graft.step, device)
    bufs = [b for b in (graft._buf, graft._abs_m, graft._scratch) if b is not None]
    counted = sum(t.numel() * t.element_size() for lst in bufs for t in lst)
    return {
        "pair": pair,
        "granularity": gran,
        "path": path,
        "param_bytes": unit,
        "graft_buffers": counted / unit,
        "held_after_first_step": held / unit,
        "graft_peak_first_step": first_peak / unit,
        "graft_peak_steady": steady_peak / unit,
        "baseline_peak": base_peak / unit,
        # the most memory the graft ever holds beyond params, grads and states: its buffers plus a
        # later step's transients, or the first step (which allocates the buffers) if higher
        "graft_peak": max(first_peak, held + steady_peak) / unit,
    }


def memory_rows(layout: str, device: str, pairs=None, quick: bool = False) -> list[dict]:
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # big blocks via mmap: freed memory leaves RSS
    for pair in _pairs():
        if pairs and pair not in pairs:
            continue
        for gran in GRANULARITIES[-1:] if quick else GRANULARITIES:
            for path in PATHS[:1] if quick else PATHS:
                cmd = [sys.executable, __file__, "--probe", f"{layout},{device},{pair},{gran},{path}"]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                # generic steps run M.step() inside, whose own transients the baseline pays too
                allowance = TARGET_BUFFERS + 0.05 + (row["baseline_peak"] if path == "generic" else 0.0)
                row["meets_target"] = row["graft_peak"] <= allowance
                rows.append(row)
                print(
                    f"  {pair:12s} {gran:7s} {path:8s} buffers {row['graft_buffers']:.2f}  "
                    f"peak {row['graft_peak']:.2f} (1st step {row['graft_peak_first_step']:.2f}, later {row['graft_peak_steady']:.2f})  "
                    f"baseline step peak {row['baseline_peak']:.2f}",
                    flush=True,
                )
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny layout, few repeats (smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layout", choices=sorted(PRESETS), help="default: cpu or gpu by device, tiny with --quick")
    ap.add_argument("--repeats", type=int, help="interleaved repeats per configuration (default 7; 3 quick)")
    ap.add_argument("--steps", type=int, help="steps per timed block (default 3; 2 quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: see RESULTS.md)")
    ap.add_argument("--pairs", nargs="*", help="subset of pairs, e.g. Adam#SGD")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.probe:
        layout, device, pair, gran, path = args.probe.split(",")
        print(json.dumps(memory_probe(layout, device, pair, gran, path)))
        return {}

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    layout = args.layout or ("tiny" if args.quick else ("gpu" if args.device == "cuda" else "cpu"))
    repeats = args.repeats or (2 if args.quick else 7)
    steps = args.steps or (1 if args.quick else 2)
    shapes = bert_shapes(**PRESETS[layout])
    print(
        f"step cost: layout {layout} ({numel(shapes) / 1e6:.1f}M parameters, {len(shapes)} tensors) on {args.device}, "
        f"{repeats} interleaved repeats x {steps} steps, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    named = make_params(shapes, device=args.device)
    rows = time_configs(named, args.device, repeats, steps, pairs=args.pairs)
    del named
    # --quick probes one configuration: a fresh process per probe costs seconds of imports
    mem_pairs = ["Adam#SGD"] if args.quick else args.pairs
    mem = [] if args.no_memory else memory_rows(layout, args.device, pairs=mem_pairs, quick=args.quick)

    time_table = table(
        ["pair", "granularity", "path", "baseline ms", "graft ms", "ratio (median)", "spread (min..max)",
         "wall ratio", "target"],
        [
            [
                r["pair"], r["granularity"], r["path"], r["base_ms"], r["graft_ms"],
                f"{r['ratio']['median']:.3f}x", f"{r['ratio']['min']:.2f}..{r['ratio']['max']:.2f}",
                f"{r['wall_ratio']['median']:.2f}x",
                ("ok" if r["meets_target"] else "MISSED") if r["path"] == "direct" else "-",
            ]
            for r in rows
        ],
    )
    mem_table = table(
        ["pair", "granularity", "path", "graft buffers", "graft peak", "baseline step peak", "target"],
        [
            [
                r["pair"], r["granularity"], r["path"], f"{r['graft_buffers']:.2f}",
                f"{r['graft_peak']:.2f}", f"{r['baseline_peak']:.2f}", "ok" if r["meets_target"] else "MISSED",
            ]
            for r in mem
        ],
    ) if mem else ""
    print("\n" + time_table)
    if mem_table:
        print("\nmemory beyond parameters, gradients and both children's states (1.00 = one parameter-sized buffer)")
        print(mem_table)
    payload = {
        "device": args.device,
        "layout": layout,
        "parameters": numel(shapes),
        "tensors": len(shapes),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "steps_per_block": steps,
        "target_ratio": TARGET_RATIO,
        "timing": rows,
        "memory": mem,
        "tables": {"timing": time_table, "memory": mem_table},
    }
    path = write_result("step_cost" + ("" if args.device == "cpu" else f"_{args.device}"), payload, args.quick)
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return payload


if __name__ == "__main__":
    main()
