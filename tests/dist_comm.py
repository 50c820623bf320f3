"""Measure what one grafted training step communicates, per rank, on a built-in task.

    torchrun --standalone --nproc-per-node 2 tests/dist_comm.py --task bert --size tiny --mode fsdp

Prints one JSON object: parameter count and bytes, the collectives of one forward/backward and of
one ``Graft.step()`` (calls and message bytes: the gathered tensor of an all-gather, the unscattered
one of a reduce-scatter), and what :func:`graftlab.distributed.step_communication` predicts.
The numbers in docs/distributed.md come from this script.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import graftlab
from graftlab import distributed as gd
from graftlab.tasks import get_task
from tests.dist_worker import CollectiveLog


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="bert")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--mode", default="fsdp", choices=gd.MODES)
    ap.add_argument("--granularity", default="layer")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = gd.init_from_env(device="cpu")
    task = get_task(args.task, size=args.size, batch_size=args.batch_size, seed=0, device=env.device, eval_size=1)
    model = gd.wrap_model(task.model, env, mode=args.mode)
    params = list(model.parameters())
    opt = graftlab.Graft(
        torch.optim.Adam(params, lr=1e-3),
        torch.optim.SGD(params, lr=0.1, momentum=0.9),
        granularity=args.granularity,
        names=gd.unwrap(model),
    )
    batches = task.train_batches()
    result = {}
    t0 = time.perf_counter()
    for t in range(args.steps):
        batch = gd.local_rows(next(batches), env)
        fb, st = CollectiveLog(), CollectiveLog()
        with fb:
            task.loss(model, batch).backward()
        with st:
            opt.step()
        opt.zero_grad()
        result = {"forward_backward": {"calls": dict(fb.calls), "bytes": dict(fb.bytes)},
                  "step": {"calls": dict(st.calls), "bytes": dict(st.bytes)}}
    elapsed = time.perf_counter() - t0
    if env.is_main:
        unwrapped = gd.unwrap(model)
        numel = sum(p.numel() for p in unwrapped.parameters())
        print(json.dumps({
            "task": f"{args.task}/{args.size}", "mode": args.mode, "world_size": env.world_size,
            "granularity": args.granularity, "groups": len(opt.group_names), "tensors": len(params),
            "param_numel": numel, "param_bytes": numel * 4, **result,
            "predicted_graft_step": gd.step_communication(opt),
            "seconds_per_step": elapsed / args.steps,
        }, indent=1))
    gd.shutdown(env)


if __name__ == "__main__":
    main()
