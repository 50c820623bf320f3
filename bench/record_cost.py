"""Recording cost: training steps/s of the ``bert`` task with a Recorder against the same run without.

Two identical copies of the task's model are trained side by side with Adam#SGD (layer-wise, so one
row per parameter tensor and step), on the same fixed batches; one copy has a
:class:`graftlab.Recorder` that records every step and logs the loss. Blocks of steps alternate
between the two, and the figure is the median over repeats of the per-block time ratio::

    python bench/record_cost.py             # bert tiny, batch 16, 5 repeats x 50-step blocks
    python bench/record_cost.py --quick     # a few short blocks (the smoke test)

Target: at most 2% slower. On CPU the clock is process CPU time (it counts the recorder's
background writer thread too, so nothing hides on the second core); on CUDA it is wall time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, quantiles, ratio_summary, stepper, table, write_result  # noqa: E402

from graftlab import Graft  # noqa: E402
from graftlab.record.recorder import Recorder  # noqa: E402
from graftlab.tasks import get_task  # noqa: E402

TARGET = 1.02


def _trainer(task, model, batches, granularity="layer"):
    """(step function, graft): ``step(rec)`` trains ``model`` one step on ``batches`` in a cycle."""
    adam = torch.optim.Adam(model.parameters(), lr=task.default_lr("adam"))
    sgd = torch.optim.SGD(model.parameters(), lr=task.default_lr("sgd"), momentum=0.9)
    graft = Graft(adam, sgd, granularity=granularity, names=model)
    return stepper(task, model, graft, batches), graft


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _block(step, n: int, device: torch.device, make_recorder=None):
    """Time ``n`` steps; with ``make_recorder`` the steps are recorded and the recorder's close()
    (its last flush and the wait for the writer) is timed with them."""

    def run() -> tuple[float, float]:
        rec = make_recorder() if make_recorder is not None else None
        _sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            step(rec)
        if rec is not None:
            rec.close()
        _sync(device)
        return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n

    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--granularity", default="layer", choices=["layer", "global"])
    ap.add_argument("--block", type=int, help="steps per timed block; the recorder flushes one part file per block "
                    "(default 50: every flush is inside the timed steps)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 7)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    block = args.block or (10 if args.quick else 50)
    repeats = args.repeats or (2 if args.quick else 5)
    batch_size = 4 if args.quick else args.batch_size

    task = get_task("bert", size=args.size, batch_size=batch_size, seed=0, device=args.device)
    gen = task.train_batches()
    batches = [next(gen) for _ in range(16)]
    model = task.model
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"record cost: bert {args.size} ({n_params / 1e6:.2f}M parameters), batch {batch_size}, {args.device}, "
        f"Adam#SGD {args.granularity}, {repeats} interleaved repeats x {block} steps",
        flush=True,
    )
    # One model and one Graft: blocks alternate between recording (a fresh Recorder per block, created
    # outside the timed region, closed inside it) and not recording, so both see the same weights.
    step, graft = _trainer(task, model, batches, granularity=args.granularity)
    with tempfile.TemporaryDirectory(prefix="graftlab-bench-") as tmp:
        recorders = []

        def make_recorder():
            rec = Recorder(graft, Path(tmp) / f"trace-{len(recorders)}", model=model, flush_every=max(block, 1),
                           metadata={"task": task.name, "batch_size": batch_size})
            recorders.append(rec)
            return rec

        for _ in range(3):  # first steps allocate optimizer state and the graft's buffer
            step()
        _block(step, 2, task.device, make_recorder)()  # and the recorder's first use (imports, pyarrow)
        res = interleave(
            {"plain": _block(step, block, task.device), "recorded": _block(step, block, task.device, make_recorder)},
            repeats,
        )
        rows_written = sum(r.rows_flushed for r in recorders[1:])
        parts = sum(len(r.parts) for r in recorders[1:])
        groups = len(graft.group_names)
    k = 1 if task.device.type == "cpu" else 0
    plain_t, rec_t = [t[k] for t in res["plain"]], [t[k] for t in res["recorded"]]
    s = ratio_summary(rec_t, plain_t)
    wall = ratio_summary([t[0] for t in res["recorded"]], [t[0] for t in res["plain"]])
    row = {
        "task": f"bert {args.size}",
        "device": str(task.device),
        "granularity": args.granularity,
        "groups": groups,
        "batch_size": batch_size,
        "clock": "process CPU time" if k else "wall",
        "plain_steps_per_s": 1 / quantiles(plain_t)["median"],
        "recorded_steps_per_s": 1 / quantiles(rec_t)["median"],
        "ratio": s,
        "wall_ratio": wall,
        "recorded_steps": rows_written,
        "parts": parts,
        "meets_target": s["median"] <= TARGET,
    }
    tab = table(
        ["task", "device", "groups", "plain steps/s", "recorded steps/s", "time ratio (median)", "spread (min..max)",
         "wall ratio", "target <= 1.02"],
        [[row["task"], row["device"], groups, row["plain_steps_per_s"], row["recorded_steps_per_s"],
          f"{s['median']:.3f}x", f"{s['min']:.3f}..{s['max']:.3f}", f"{wall['median']:.3f}x",
          "ok" if row["meets_target"] else "MISSED"]],
    )
    print("\n" + tab)
    path = write_result("record_cost" + ("" if task.device.type == "cpu" else "_cuda"),
                        {"result": row, "block": block, "repeats": repeats, "tables": {"record": tab}}, args.quick)
    print(f"\nwrote {path}")
    return row


if __name__ == "__main__":
    main()
