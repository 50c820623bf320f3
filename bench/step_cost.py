"""Step cost of grafting against the strongest ways to run both children.

``Graft(M, D).step()`` on the direct path (eager foreach rules) and on the fused path
(:mod:`graftlab.graft.fused`: two passes, ``torch.compile``d) is timed against ``M.step(); D.step()`` in
every form torch offers the children: its defaults, ``foreach=True``, and ``fused=True`` for the
children that have a fused kernel (the others keep their foreach form). All forms and candidates are
warmed up and interleaved in one process on one set of parameters (a BERT-style layout: ~26M
parameters in 138 tensors on CPU, BERT-base's 110M on a GPU); per repeat the fastest baseline form
is the reference, and a ratio is the median over repeats of candidate / that reference, with its
spread. CPU: process CPU time at one torch thread; CUDA: wall time with a synchronisation at the
ends of each block. The fused path's one-off compile (its first step, a fresh inductor cache) is
timed on its own. Further parts: the cost of recording a fused step (a Recorder on the same step),
and the peak memory a grafted step needs beyond parameters, gradients and both children's states::

    python bench/step_cost.py              # full size (~30 minutes on 2 busy CPU cores, compiles included)
    python bench/step_cost.py --quick      # tiny layout, fused path uncompiled (the smoke test)

Targets: the fused step at most 0.9x the strongest baseline; a recorded fused step at most 2% slower
than an unrecorded one; at most one parameter-sized buffer beyond the children's states.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, quantiles, ratio_summary, table, write_result  # noqa: E402
from layouts import PRESETS, bert_shapes, make_params, numel  # noqa: E402

from graftlab import Graft  # noqa: E402
from graftlab.graft import fused as fused_mod  # noqa: E402
from graftlab.record.recorder import Recorder  # noqa: E402

TARGET_RATIO = 0.9  # fused path / strongest baseline
TARGET_RECORD = 1.02
TARGET_BUFFERS = 1.0
RECORD_FLUSH = 50  # Recorder's default flush interval (steps)
FORMS = ("default", "foreach", "fused")
GRANULARITIES = ("global", "layer")
PATHS = ("direct", "fused")


def _has_fused(cls) -> bool:
    return "fused" in inspect.signature(cls.__init__).parameters


def _pairs():
    """name -> (make_M, make_D); ``make(params, form)`` builds the child in a baseline form.

    Hyperparameters typical of the paper's experiments.
    """

    def maker(cls, **kw):
        def make(params, form="default"):
            extra = {}
            if form == "foreach" or (form == "fused" and not _has_fused(cls)):
                extra = {"foreach": True}
            elif form == "fused":
                extra = {"fused": True}
            return cls(params, **kw, **extra)

        return make

    sgd = maker(torch.optim.SGD, lr=0.1, momentum=0.9)
    return {
        "Adam#SGD": (maker(torch.optim.Adam, lr=1e-3), sgd),
        "SGD#AdaGrad": (sgd, maker(torch.optim.Adagrad, lr=0.01)),
        "AdamW#SGD": (maker(torch.optim.AdamW, lr=1e-3, weight_decay=0.01), sgd),
    }


def make_graft(m, d, named, granularity: str, path: str, compile: bool = True) -> Graft:
    """A Graft on ``path``: ``direct``, ``generic`` or ``fused`` (``fused=True``; uncompiled
    passes without ``compile``, as the smoke test runs them)."""
    if path != "fused":
        return Graft(m, d, granularity=granularity, names=named, path=path)
    # the module default is read when the Graft builds its fused step: set it for this Graft only
    default, fused_mod.COMPILE = fused_mod.COMPILE, compile
    try:
        graft = Graft(m, d, granularity=granularity, names=named, fused=True)
    finally:
        fused_mod.COMPILE = default
    assert graft._fused.compile == compile
    return graft


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


def _first_step(fn, device: str) -> dict:
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return {"wall_s": time.perf_counter() - wall, "process_cpu_s": time.process_time() - cpu}


def time_configs(named, device, repeats, steps, pairs=None, grans=GRANULARITIES, paths=PATHS, compile=True):
    params = [p for _, p in named]
    k = 1 if device == "cpu" else 0  # CPU: process CPU time counts our work, not the neighbours'
    rows, compiles = [], []
    for pair, (make_m, make_d) in _pairs().items():
        if pairs and pair not in pairs:
            continue
        bases = {}
        for form in FORMS:
            m, d = make_m(params, form), make_d(params, form)
            bases[form] = (lambda m=m, d=d: (m.step(), d.step()))
            for _ in range(2):  # the baselines' states exist before anything is timed
                bases[form]()
        for gran in grans:
            grafts = {}
            for path in paths:
                g = make_graft(make_m(params), make_d(params), named, gran, path, compile=compile)
                first = _first_step(g.step, device)
                if path == "fused" and compile and first["wall_s"] > 1.0:
                    compiles.append({"pair": pair, "granularity": gran, **first})
                    print(f"  {pair:12s} {gran:7s} fused: first step (compile) {first['wall_s']:.1f} s wall, "
                          f"{first['process_cpu_s']:.1f} s process CPU", flush=True)
                g.step()
                grafts[path] = g
            blocks = {f"base:{f}": _block(fn, steps, device) for f, fn in bases.items()}
            blocks.update({f"graft:{p}": _block(g.step, steps, device) for p, g in grafts.items()})
            res = interleave(blocks, repeats)
            t = {name: [x[k] for x in v] for name, v in res.items()}
            best = [min(t[f"base:{f}"][r] for f in FORMS) for r in range(repeats)]
            winners = [min(FORMS, key=lambda f: t[f"base:{f}"][r]) for r in range(repeats)]
            for path in paths:
                cand = t[f"graft:{path}"]
                s = ratio_summary(cand, best)
                wall = ratio_summary([x[0] for x in res[f"graft:{path}"]],
                                     [min(res[f"base:{f}"][r][0] for f in FORMS) for r in range(repeats)])
                row = {
                    "pair": pair, "granularity": gran, "path": path, "groups": len(grafts[path].group_names),
                    "clock": "process CPU time" if k else "wall",
                    "graft_ms": quantiles(cand)["median"] * 1e3,
                    "best_base_ms": quantiles(best)["median"] * 1e3,
                    "base_ms": {f: quantiles(t[f"base:{f}"])["median"] * 1e3 for f in FORMS},
                    "best_form": max(set(winners), key=winners.count),
                    "ratio": s,
                    "ratio_vs": {f: ratio_summary(cand, t[f"base:{f}"]) for f in FORMS},
                    "wall_ratio": wall,
                    "meets_target": path != "fused" or s["median"] <= TARGET_RATIO,
                }
                rows.append(row)
                print(
                    f"  {pair:12s} {gran:7s} {path:7s} {row['graft_ms']:7.1f} ms; vs strongest ({row['best_form']}) "
                    f"{s['median']:.3f} [{s['min']:.2f}..{s['max']:.2f}]; vs "
                    + ", ".join(f"{f} {row['ratio_vs'][f]['median']:.2f}" for f in FORMS),
                    flush=True,
                )
            del grafts
    return rows, compiles


def record_cost(named, device, repeats, steps, compile=True) -> dict:
    """A fused Adam#SGD layer-wise step with a Recorder (every step; a flush per block) against without."""
    params = [p for _, p in named]
    make_m, make_d = _pairs()["Adam#SGD"]
    plain = make_graft(make_m(params), make_d(params), named, "layer", "fused", compile=compile)
    recorded = make_graft(make_m(params), make_d(params), named, "layer", "fused", compile=compile)
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(recorded, Path(tmp) / "trace", flush_every=RECORD_FLUSH)
        try:
            for g in (plain, recorded):
                g.step()
                g.step()
            res = interleave({"plain": _block(plain.step, steps, device), "recorded": _block(recorded.step, steps, device)}, repeats)
        finally:
            rec.close()
    k = 1 if device == "cpu" else 0
    s = ratio_summary([x[k] for x in res["recorded"]], [x[k] for x in res["plain"]])
    wall = ratio_summary([x[0] for x in res["recorded"]], [x[0] for x in res["plain"]])
    out = {"pair": "Adam#SGD", "granularity": "layer", "groups": len(plain.group_names), "steps_per_block": steps,
           "plain_ms": quantiles([x[k] for x in res["plain"]])["median"] * 1e3,
           "recorded_ms": quantiles([x[k] for x in res["recorded"]])["median"] * 1e3,
           "ratio": s, "wall_ratio": wall, "meets_target": s["median"] <= TARGET_RECORD}
    print(f"  recorded / plain fused step: {s['median']:.3f} [{s['min']:.2f}..{s['max']:.2f}], wall {wall['median']:.3f}", flush=True)
    return out


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


def memory_probe(layout: str, device: str, pair: str, gran: str, path: str, compile: bool) -> dict:
    """One configuration in a fresh process: baseline step peak, then the grafted steps' peaks.

    The fused path compiles on its first step (compiler memory, not the step's): its first step runs
    before measuring, so that its figures are a steady step's.
    """
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
    graft = make_graft(m, d, named, gran, path, compile=compile)
    if path == "fused":
        graft.step()
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


def memory_rows(layout: str, device: str, pairs=None, quick: bool = False, paths=PATHS, compile=True) -> list[dict]:
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # big blocks via mmap: freed memory leaves RSS
    for pair in _pairs():
        if pairs and pair not in pairs:
            continue
        for gran in GRANULARITIES[-1:] if quick else GRANULARITIES:
            for path in paths:
                if path == "fused" and gran != "layer":
                    continue  # one probe per pair: the fused passes do not depend on the partition
                probe = f"{layout},{device},{pair},{gran},{path},{int(compile)}"
                out = subprocess.run([sys.executable, __file__, "--probe", probe], env=env, capture_output=True, text=True, check=True)
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


def _tables(rows, compiles, rec, mem) -> dict:
    timing = table(
        ["pair", "granularity", "path", "graft ms", "strongest baseline ms (form)", "ratio (median)",
         "spread (min..max)", "vs default", "vs foreach", "vs fused", "wall ratio", "target <= 0.9"],
        [
            [
                r["pair"], r["granularity"], r["path"], r["graft_ms"], f"{r['best_base_ms']:.3g} ({r['best_form']})",
                f"{r['ratio']['median']:.3f}x", f"{r['ratio']['min']:.2f}..{r['ratio']['max']:.2f}",
                *(f"{r['ratio_vs'][f]['median']:.2f}x" for f in FORMS), f"{r['wall_ratio']['median']:.2f}x",
                ("ok" if r["meets_target"] else "MISSED") if r["path"] == "fused" else "-",
            ]
            for r in rows
        ],
    )
    baselines = table(
        ["pair", "granularity", "default ms", "foreach ms", "fused ms"],
        [[r["pair"], r["granularity"], *(r["base_ms"][f] for f in FORMS)] for r in rows if r["path"] == rows[0]["path"]],
    ) if rows else ""
    comp = table(
        ["pair", "granularity", "first fused step, wall s", "process CPU s"],
        [[c["pair"], c["granularity"], c["wall_s"], c["process_cpu_s"]] for c in compiles],
    ) if compiles else ""
    record = table(
        ["pair", "granularity", "groups", "plain ms", "recorded ms", "ratio (median)", "spread (min..max)", "wall ratio", "target <= 1.02"],
        [[rec["pair"], rec["granularity"], rec["groups"], rec["plain_ms"], rec["recorded_ms"], f"{rec['ratio']['median']:.3f}x",
          f"{rec['ratio']['min']:.2f}..{rec['ratio']['max']:.2f}", f"{rec['wall_ratio']['median']:.3f}x",
          "ok" if rec["meets_target"] else "MISSED"]],
    ) if rec else ""
    memory = table(
        ["pair", "granularity", "path", "graft buffers", "graft peak", "baseline step peak", "target"],
        [
            [r["pair"], r["granularity"], r["path"], f"{r['graft_buffers']:.2f}", f"{r['graft_peak']:.2f}",
             f"{r['baseline_peak']:.2f}", "ok" if r["meets_target"] else "MISSED"]
            for r in mem
        ],
    ) if mem else ""
    return {"timing": timing, "baselines": baselines, "compile": comp, "record": record, "memory": memory}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny layout, few repeats, fused path uncompiled (smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layout", choices=sorted(PRESETS), help="default: cpu or gpu by device, tiny with --quick")
    ap.add_argument("--repeats", type=int, help="interleaved repeats per configuration (default 7; 2 quick)")
    ap.add_argument("--steps", type=int, help="steps per timed block (default 2; 1 quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: see RESULTS.md)")
    ap.add_argument("--pairs", nargs="*", help="subset of pairs, e.g. Adam#SGD")
    ap.add_argument("--paths", nargs="*", choices=("direct", "generic", "fused"), help="default: direct fused")
    ap.add_argument("--no-compile", action="store_true", help="run the fused path uncompiled (default with --quick)")
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (compile time then is a cache hit)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    ap.add_argument("--no-record", action="store_true", help="skip the recording measurement")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.probe:
        layout, device, pair, gran, path, comp = args.probe.split(",")
        print(json.dumps(memory_probe(layout, device, pair, gran, path, bool(int(comp)))))
        return {}

    compile = not (args.no_compile or args.quick)
    cache = None
    if compile and not args.warm_cache:  # a cold compile, as a user's first run; probes reuse it
        cache = tempfile.TemporaryDirectory(prefix="graftlab-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    layout = args.layout or ("tiny" if args.quick else ("gpu" if args.device == "cuda" else "cpu"))
    repeats = args.repeats or (2 if args.quick else 7)
    steps = args.steps or (1 if args.quick else 2)
    paths = tuple(args.paths or PATHS)
    shapes = bert_shapes(**PRESETS[layout])
    print(
        f"step cost: layout {layout} ({numel(shapes) / 1e6:.1f}M parameters, {len(shapes)} tensors) on {args.device}, "
        f"{repeats} interleaved repeats x {steps} steps, torch threads {torch.get_num_threads()}, "
        f"fused path {'compiled' if compile else 'uncompiled'}",
        flush=True,
    )
    named = make_params(shapes, device=args.device)
    rows, compiles = time_configs(named, args.device, repeats, steps, pairs=args.pairs, paths=paths, compile=compile)
    rec = None
    if not args.no_record and "fused" in paths:
        # blocks as long as the recorder's flush interval: every recorded block pays one flush
        rec = record_cost(named, args.device, repeats, 3 if args.quick else RECORD_FLUSH, compile=compile)
    del named
    # --quick probes one configuration: a fresh process per probe costs seconds of imports
    mem_pairs = ["Adam#SGD"] if args.quick else args.pairs
    mem = [] if args.no_memory else memory_rows(layout, args.device, pairs=mem_pairs, quick=args.quick,
                                                paths=paths[:1] if args.quick else paths, compile=compile)
    if cache is not None:
        cache.cleanup()
    tables = _tables(rows, compiles, rec, mem)
    for name in ("timing", "baselines", "compile", "record", "memory"):
        if tables[name]:
            print("\n" + tables[name])
    payload = {
        "device": args.device,
        "layout": layout,
        "parameters": numel(shapes),
        "tensors": len(shapes),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "steps_per_block": steps,
        "fused_compiled": compile,
        "target_ratio": TARGET_RATIO,
        "timing": rows,
        "compile": compiles,
        "record": rec,
        "memory": mem,
        "tables": tables,
    }
    path = write_result("step_cost" + ("" if args.device == "cpu" else f"_{args.device}"), payload, args.quick)
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return payload


if __name__ == "__main__":
    main()
