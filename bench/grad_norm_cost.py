"""Cost of the recorder's per-group gradient norms (trace column ``norm_g``) against a training step.

The ``bert`` task's model trains with Adam#SGD (layer-wise); blocks of plain steps alternate with
blocks whose every step also takes the gradient norms (what the Recorder does on every
``grad_every``-th recorded step, default 10). The figure is the median over repeats of the per-block
time ratio; the cost per recorded step at the default is that excess divided by 10::

    python bench/grad_norm_cost.py            # bert tiny, batch 16, 7 repeats x 20-step blocks
    python bench/grad_norm_cost.py --quick

On CPU the clock is process CPU time; on CUDA wall time after a synchronize.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, ratio_summary, table, write_result  # noqa: E402

from graftlab import Graft  # noqa: E402
from graftlab.record.grad_norms import GradNorms  # noqa: E402
from graftlab.record.recorder import DEFAULT_GRAD_EVERY  # noqa: E402
from graftlab.tasks import get_task  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    block, repeats = (5, 2) if args.quick else (20, 7)
    task = get_task("bert", size="tiny", batch_size=4 if args.quick else args.batch_size, seed=0, device=args.device)
    gen = task.train_batches()
    batches = [next(gen) for _ in range(8)]
    model = task.model
    graft = Graft(torch.optim.Adam(model.parameters(), lr=1e-3),
                  torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), names=model)
    norms = GradNorms(graft, 1)
    ring = torch.full((1, len(graft.group_names)), float("nan"), device=task.device)
    cuda = task.device.type == "cuda"
    state = {"i": 0}

    def run(with_norms: bool):
        def timed() -> float:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter() if cuda else time.process_time()
            for _ in range(block):
                loss = task.loss(model, batches[state["i"] % len(batches)])
                state["i"] += 1
                loss.backward()
                graft.step()
                if with_norms:
                    norms.write(ring, 0, 0)
                graft.zero_grad()
            if cuda:
                torch.cuda.synchronize()
            return ((time.perf_counter() if cuda else time.process_time()) - t0) / block
        return timed

    def norms_alone() -> float:
        # the same call on the last step's gradients, timed by itself: the step-to-step noise of
        # whole blocks is larger than the cost
        loss = task.loss(model, batches[0])
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter() if cuda else time.process_time()
        for _ in range(block):
            norms.write(ring, 0, 0)
        if cuda:
            torch.cuda.synchronize()
        t = ((time.perf_counter() if cuda else time.process_time()) - t0) / block
        graft.zero_grad()
        return t

    run(False)()  # optimizer state and buffers
    res = interleave({"plain": run(False), "norms": run(True), "alone": norms_alone}, repeats)
    s = ratio_summary(res["norms"], res["plain"])
    alone = ratio_summary(res["alone"], res["plain"])
    row = {"device": str(task.device), "groups": len(graft.group_names), "ratio_every_step": s,
           "norms_over_step": alone, "per_recorded_step_at_default": alone["median"] / DEFAULT_GRAD_EVERY}
    tab = table(["device", "groups", "step + norms / step (median, spread)", "norms alone / step",
                 f"per recorded step, every {DEFAULT_GRAD_EVERY}th (default)"],
                [[row["device"], row["groups"], f"{s['median']:.4f}x ({s['min']:.3f}..{s['max']:.3f})",
                  f"{alone['median']:.4f} ({alone['min']:.4f}..{alone['max']:.4f})",
                  f"+{row['per_recorded_step_at_default']:.5f}"]])
    print(tab)
    print(f"wrote {write_result('grad_norm_cost', {'result': row, 'tables': {'cost': tab}}, args.quick)}")
    return row


if __name__ == "__main__":
    main()
