"""Multi-process grafting runs for tests/distributed/test_distributed.py, and their one-process references.

Started by the tests as ``torchrun --standalone --nproc-per-node 2 tests/dist_worker.py OUT`` (gloo on
CPU; with ``GRAFTLAB_DIST_DEVICE=cuda`` on two GPUs, NCCL). Every
scenario trains the same small float64 MLP on the same global batches (each rank keeps its rows) and
writes, from rank 0, the per-step ``last_stats``, the final whole weights and the collectives seen
during one ``graft.step()`` (and during one forward/backward) to ``OUT/<scenario>.pt``.
The test computes the same runs in one process with :func:`run_single` and compares.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

import graftlab
from graftlab import distributed as gd
from graftlab.record.recorder import Recorder

STEPS = 5
CKPT_AT = 3  # the checkpoint scenario saves after this many steps
GLOBAL_BATCH = 8
DTYPE = torch.float64


def build_model() -> nn.Module:
    """Uneven shards on purpose: 5 and 1 output rows over 2 ranks (rank 1 holds empty pieces)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 1)).to(DTYPE)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=DTYPE)
    return x, torch.sin(x.sum(1, keepdim=True))


def _first(name: str) -> str:
    return "block" + name.split(".")[0]


# scenario -> (magnitude factory, direction factory, granularity, path)
SCENARIOS = {
    "direct_layer": (
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "layer",
        "direct",
    ),
    "generic_layer": (
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "layer",
        "generic",
    ),
    "direct_custom": (
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.01),
        _first,
        "direct",
    ),
    "generic_global": (
        lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
        lambda p: torch.optim.SGD(p, lr=0.05),
        "global",
        "generic",
    ),
    "direct_coordinate": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.Adagrad(p, lr=0.1),
        "coordinate",
        "direct",
    ),
}


def make_graft(model: nn.Module, scenario: str) -> graftlab.Graft:
    mag, dirn, granularity, path = SCENARIOS[scenario]
    params = list(model.parameters())
    return graftlab.Graft(mag(params), dirn(params), granularity=granularity, names=gd.unwrap(model), path=path)


def train_step(model, opt, step: int, env: gd.DistEnv) -> None:
    x, y = gd.local_rows(tuple(t.to(env.device) for t in batch(step)), env)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors by name (gathers sharded ones)."""
    model = gd.unwrap(model)
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone() for n, p in model.named_parameters()}


def run_single(scenario: str, steps: int = STEPS, model=None, opt=None, start: int = 0) -> dict:
    """The one-process reference: full global batch every step."""
    env = gd.DistEnv()
    model = model if model is not None else build_model()
    opt = opt if opt is not None else make_graft(model, scenario)
    stats = []
    for t in range(start, steps):
        train_step(model, opt, t, env)
        stats.append(opt.last_stats.clone())
    return {"stats": torch.stack(stats) if stats else None, "weights": full_weights(model), "groups": opt.group_names}


class CollectiveLog(TorchDispatchMode):
    """Counts c10d collectives per rank and their message bytes: the largest tensor argument of each
    call (the gathered tensor of an all-gather, the unscattered one of a reduce-scatter)."""

    def __init__(self):
        super().__init__()
        self.calls = defaultdict(int)
        self.bytes = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func.name().split("::")[-1].split(".")[0]
            if not name.startswith(("wait", "barrier", "monitored_barrier")):
                self.calls[name] += 1
                self.bytes[name] += max(t.numel() * t.element_size() for t in _tensors(args))
        return func(*args, **(kwargs or {}))


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def run_distributed(
    mode: str, scenario: str, env: gd.DistEnv, out: Path, ckpt: Path | None = None, trace: Path | None = None
) -> None:
    model = gd.wrap_model(build_model().to(env.device), env, mode=mode)
    opt = make_graft(model, scenario)
    recorded = []
    consumer = gd.main_only(lambda: recorded)  # rank 0 keeps rows; the others a no-op stand-in
    recorder = contextlib.nullcontext()
    if trace is not None:  # the real Recorder, on rank 0 only
        recorder = gd.main_only(Recorder, opt, trace, model=gd.unwrap(model), flush_every=2)
    comm = {}
    with recorder:
        for t in range(STEPS):
            if t == 1:  # after the first step: buffers and optimizer state exist
                fb, st = CollectiveLog(), CollectiveLog()
                x, y = gd.local_rows(tuple(v.to(env.device) for v in batch(t)), env)
                with fb:
                    nn.functional.mse_loss(model(x), y).backward()
                with st:
                    opt.step()
                opt.zero_grad()
                comm = {"forward_backward": (dict(fb.calls), dict(fb.bytes)), "step": (dict(st.calls), dict(st.bytes))}
            else:
                train_step(model, opt, t, env)
            consumer.append(opt.last_stats.clone())
            if ckpt is not None and t + 1 == CKPT_AT:
                gd.save_checkpoint(ckpt, model, opt, extra={"step": t + 1})
    weights = full_weights(model)  # collective under FSDP: every rank calls it
    if env.is_main:
        torch.save(
            {
                "stats": torch.stack(recorded).cpu(),
                "weights": weights,
                "groups": opt.group_names,
                "comm": comm,
                "expected_step_comm": gd.step_communication(opt),
                "consumer_type": type(consumer).__name__,
            },
            out / f"{mode}-{scenario}.pt",
        )
    else:
        (out / f"rank{env.rank}-{mode}-{scenario}.txt").write_text(type(consumer).__name__)


def main(out: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    env = gd.init_from_env(device=os.environ.get("GRAFTLAB_DIST_DEVICE", "cpu"))  # cuda: NCCL
    try:
        run_distributed("ddp", "direct_layer", env, out, trace=out / "trace-ddp")
        run_distributed("fsdp", "direct_layer", env, out, ckpt=out / "ckpt-fsdp", trace=out / "trace-fsdp")
        for scenario in ("generic_layer", "direct_custom", "generic_global", "direct_coordinate"):
            run_distributed("fsdp", scenario, env, out)
    finally:
        gd.shutdown(env)


if __name__ == "__main__":
    main(sys.argv[1])
