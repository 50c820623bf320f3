"""One process of FSDP2 (gloo, CPU): a Graft built before ``fully_shard``, its tensors swapped by
accelerate's own ``fsdp2_switch_optimizer_parameters``, steps as a Graft built on the shards.
Prints one JSON line; run by tests/distributed/test_fsdp2_swap.py in its own process."""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

import graftlab


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def main(port: str) -> None:
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    model, ref = mlp(), mlp()
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(model.parameters(), lr=0.1),
                           names=model, split=None)
    names = graft.group_names
    old = dict(model.named_parameters())
    for group in graft.param_groups:  # what accelerate's prepare does before fully_shard
        for i, p in enumerate(group["params"]):
            placeholder = torch.empty(1, dtype=p.dtype)
            placeholder.data_ptr = id(p)
            group["params"][i] = placeholder
    fully_shard(model)
    new = dict(model.named_parameters())
    fsdp2_switch_optimizer_parameters(graft, {id(old[n]): new[n] for n in old})
    fully_shard(ref)
    ref_graft = graftlab.Graft(torch.optim.Adam(ref.parameters(), lr=1e-2),
                               torch.optim.SGD(ref.parameters(), lr=0.1), names=ref, split=None)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
        for m, o in ((model, graft), (ref, ref_graft)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    diff = max((p.full_tensor() - q.full_tensor()).abs().max().item()
               for p, q in zip(model.parameters(), ref.parameters()))
    moved = min((p.full_tensor() - old[n]).abs().max().item() for n, p in model.named_parameters())
    print(json.dumps({"names_kept": graft.group_names == names, "sharded": graft._layout is not None,
                      "weights_diff": diff, "min_moved": moved,
                      "stats_diff": (graft.last_stats - ref_graft.last_stats).abs().max().item()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
