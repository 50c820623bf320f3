"""Sharded (DTensor) parameters are not grafted per head or per row: one clear error, in one process."""
import pytest
import torch
import torch.distributed as dist

from graftlab import Graft
from graftlab.errors import GraftlabError
from graftlab.tasks.gpt import GPT, GPTConfig


def test_head_and_vocab_refuse_sharded_parameters(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = GPT(GPTConfig(vocab_size=23, hidden=8, layers=1, heads=4, intermediate=16, seq_len=6))
        pairs = [(n, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
                 for n, p in model.named_parameters()]
        ps = [p for _, p in pairs]
        for granularity in ("head", "vocab"):
            with pytest.raises(GraftlabError, match="cannot be grafted per head or per row"):
                Graft(torch.optim.Adam(ps), torch.optim.SGD(ps, lr=0.1), granularity=granularity, names=pairs,
                      heads=4)
        assert Graft(torch.optim.Adam(ps), torch.optim.SGD(ps, lr=0.1), names=pairs).partition.granularity == "layer"
    finally:
        dist.destroy_process_group()
