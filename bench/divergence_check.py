"""Divergence check cost: training steps/s of the ``bert`` task with the per-step non-finite check
(:class:`graftlab.runs.divergence.NonFiniteWatch`, what :func:`graftlab.runs.fit` runs every step)
against the same steps without it, in the same process.

Two optimizers, since the check differs: plain SGD (the groups are the parameter tensors, checked
through one ``_foreach_norm`` of the gradients) and Adam#SGD layer-wise (the groups come from the
Graft's own per-group norms). Blocks of steps alternate between checked and unchecked on one model
(ABBA order); the figure is the median over repeats of the per-block time ratio. The check alone
(``observe`` + ``poll`` on the last step's gradients, no training) is timed too, per step::

    python bench/divergence_check.py            # bert tiny, batch 16, 7 repeats x 40-step blocks
    python bench/divergence_check.py --quick    # a few short blocks (the smoke test)

Target: at most 1% slower. On CPU the clock is process CPU time; on CUDA it is wall time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, quantiles, ratio_summary, table, write_result  # noqa: E402

from graftlab import Graft  # noqa: E402
from graftlab.runs.divergence import NonFiniteWatch  # noqa: E402
from graftlab.tasks import get_task  # noqa: E402

TARGET = 1.01


def _optimizer(kind: str, task, model):
    if kind == "SGD":
        return torch.optim.SGD(model.parameters(), lr=task.default_lr("sgd"), momentum=0.9)
    adam = torch.optim.Adam(model.parameters(), lr=task.default_lr("adam"))
    sgd = torch.optim.SGD(model.parameters(), lr=task.default_lr("sgd"), momentum=0.9)
    return Graft(adam, sgd, granularity="layer", names=model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(device: torch.device) -> float:
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def _block(task, opt, batches, state, n: int, watch=None):
    """Time ``n`` training steps (the loop of ``fit``: loss, backward, step, check)."""

    def run() -> float:
        _sync(task.device)
        t0 = _clock(task.device)
        for _ in range(n):
            step = state["step"]
            state["step"] += 1
            loss = task.loss(task.model, batches[step % len(batches)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if watch is not None:
                watch.observe(step, loss.detach())
                if watch.poll() is not None:
                    raise RuntimeError(f"the benchmark run diverged at step {step}")
        if watch is not None and watch.poll(wait=True) is not None:
            raise RuntimeError("the benchmark run diverged")
        _sync(task.device)
        return (_clock(task.device) - t0) / n

    return run


def _check_alone(task, opt, watch, n: int, loss) -> float:
    """Seconds per ``observe`` + ``poll`` on fixed gradients and stats, without training."""
    _sync(task.device)
    t0 = time.perf_counter()
    for i in range(n):
        watch.observe(10**9 + i, loss)
        watch.poll()
    watch.poll(wait=True)
    _sync(task.device)
    return (time.perf_counter() - t0) / n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--block", type=int, help="steps per timed block (default 40)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 7)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    block = args.block or (4 if args.quick else 40)
    repeats = args.repeats or (2 if args.quick else 7)
    batch_size = 4 if args.quick else args.batch_size
    rows = []
    for kind in ("SGD", "Adam#SGD"):
        task = get_task("bert", size=args.size, batch_size=batch_size, seed=0, device=args.device)
        gen = task.train_batches()
        batches = [next(gen) for _ in range(16)]
        opt = _optimizer(kind, task, task.model)
        watch = NonFiniteWatch(opt, task.model, task.device)
        state = {"step": 0}
        _block(task, opt, batches, state, 3, watch)()  # optimizer state, buffers, first use of the watch
        res = interleave({"plain": _block(task, opt, batches, state, block),
                          "checked": _block(task, opt, batches, state, block, watch)}, repeats)
        s = ratio_summary(res["checked"], res["plain"])
        loss = task.loss(task.model, batches[0]).detach()
        alone = quantiles([_check_alone(task, opt, watch, 20 if args.quick else 200, loss) for _ in range(3)])
        plain = quantiles(res["plain"])["median"]
        rows.append({
            "optimizer": kind, "groups": len(watch.names), "checked_via": watch.what,
            "plain_steps_per_s": 1 / plain, "checked_steps_per_s": 1 / quantiles(res["checked"])["median"],
            "ratio": s, "check_alone_us": alone["median"] * 1e6, "check_alone_share": alone["median"] / plain,
            "meets_target": s["median"] <= TARGET,
        })
    n_params = sum(p.numel() for p in task.model.parameters())
    clock = "process CPU time" if args.device == "cpu" else "wall"
    print(f"divergence check cost: bert {args.size} ({n_params / 1e6:.2f}M parameters), batch {batch_size}, "
          f"{args.device}, {repeats} interleaved repeats x {block} steps, clock: {clock}")
    tab = table(
        ["optimizer", "groups", "checked via", "plain steps/s", "checked steps/s", "time ratio (median)",
         "spread (min..max)", "check alone (us/step)", "target <= 1.01"],
        [[r["optimizer"], r["groups"], r["checked_via"], r["plain_steps_per_s"], r["checked_steps_per_s"],
          f"{r['ratio']['median']:.3f}x", f"{r['ratio']['min']:.3f}..{r['ratio']['max']:.3f}",
          f"{r['check_alone_us']:.0f} ({100 * r['check_alone_share']:.2f}% of a step)",
          "ok" if r["meets_target"] else "MISSED"] for r in rows],
    )
    print("\n" + tab)
    name = "divergence_check" + ("" if args.device == "cpu" else "_cuda")
    path = write_result(name, {"results": rows, "block": block, "repeats": repeats, "device": args.device,
                               "size": args.size, "batch_size": batch_size, "parameters": n_params,
                               "clock": clock, "tables": {"check": tab}}, args.quick)
    print(f"\nwrote {path}")
    return {"results": rows}


if __name__ == "__main__":
    main()
