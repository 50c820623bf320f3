"""Where a grafted step's time goes: torch.profiler over ``Graft.step()`` and over the baseline.

Each phase of the direct path (M's rule, M's norms, D's rule, D's norms, the ratio, the rescale and
the update of the weights) is wrapped in a ``record_function`` range, so the table splits the
step's time by phase and by op::

    python bench/profile_step.py                       # Adam#SGD layer, direct, BERT ~26M layout
    python bench/profile_step.py --pair SGD#AdaGrad --granularity global
    python bench/profile_step.py --quick

Only this process's copy of ``Graft`` is instrumented (the library is not changed).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_result  # noqa: E402
from layouts import PRESETS, bert_shapes, make_params  # noqa: E402
from step_cost import _pairs  # noqa: E402

from graftlab import Graft  # noqa: E402


def _ranged(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with record_function(name):
            return fn(*a, **k)

    return wrapper


def instrument(graft: Graft) -> None:
    """Wrap the phases of ``graft``'s step in profiler ranges (on this instance only)."""
    m_rule, d_rule = graft._rules if graft._rules is not None else (None, None)
    if m_rule is not None:
        graft._rules = (_ranged("graft: M rule", m_rule), _ranged("graft: D rule", d_rule))
    graft._group_norms = _ranged("graft: group norms", graft._group_norms)
    graft._record = _ranged("graft: ratio + factors", graft._record)
    for name in ("magnitude", "direction"):
        child = getattr(graft, name)
        child.step = _ranged(f"graft: {name}.step()", child.step)


def profile_steps(fn, steps: int, row_limit: int):
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])) as prof:
        for _ in range(steps):
            fn()
    events = prof.key_averages()
    rows = []
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total):
        rows.append({"name": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3 / steps,
                     "total_ms": e.cpu_time_total / 1e3 / steps})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pair", default="Adam#SGD", choices=list(_pairs()))
    ap.add_argument("--granularity", default="layer")
    ap.add_argument("--path", default="direct", choices=["direct", "generic"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layout = "tiny" if args.quick else ("gpu" if torch.cuda.is_available() else "cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    named = make_params(bert_shapes(**PRESETS[layout]), device=device)
    params = [p for _, p in named]
    make_m, make_d = _pairs()[args.pair]
    base_m, base_d = make_m(params), make_d(params)
    graft = Graft(make_m(params), make_d(params), granularity=args.granularity, names=named, path=args.path)
    instrument(graft)

    def base():
        with record_function("baseline: M.step()"):
            base_m.step()
        with record_function("baseline: D.step()"):
            base_d.step()

    for _ in range(2):
        base()
        graft.step()
    out = {}
    for label, fn in (("baseline", base), ("graft", graft.step)):
        rows = profile_steps(fn, args.steps, args.rows)
        total = sum(r["self_ms"] for r in rows)
        ranges = [r for r in rows if r["name"].startswith(("graft:", "baseline:"))]
        ops = [r for r in rows if not r["name"].startswith(("graft:", "baseline:", "ProfilerStep"))][: args.rows]
        out[label] = {"self_ms_total": total, "ranges": ranges, "ops": ops}
        print(f"\n{label}: {total:.1f} ms of op self time per step ({args.pair} {args.granularity} {args.path}, {layout})")
        print(table(["phase", "ms/step (incl. children)"], [[r["name"], r["total_ms"]] for r in ranges]))
        print(table(["op", "calls/step", "self ms/step", "share"],
                    [[r["name"], r["calls"] // args.steps, r["self_ms"], f"{100 * r['self_ms'] / total:.0f}%"]
                     for r in ops]))
    write_result(f"profile_{args.pair.replace('#', '_')}_{args.granularity}_{args.path}",
                 {"layout": layout, "device": device, **out}, args.quick)
    return out


if __name__ == "__main__":
    main()
