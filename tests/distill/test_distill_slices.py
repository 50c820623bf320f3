"""Traces recorded per head and per vocabulary row block distil into per-slice factors and schedules
that apply back to the same model; kinds travel per group."""
import math

import pytest
import torch
from torch import nn

from graftlab import Graft, Recorder, read_trace
from graftlab.corrections import apply
from graftlab.distill.pipeline import distill
from graftlab.tasks.gpt import GPT, GPTConfig
from graftlab.trace import read_metadata

V = 23


def gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, hidden=8, layers=1, heads=4, intermediate=16, seq_len=6))


def record(path, granularity, steps=12):
    model = gpt()
    opt = Graft(torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.SGD(model.parameters(), lr=0.1),
                granularity=granularity, row_block=10 if granularity == "vocab" else 1, names=model)
    with Recorder(opt, path, model=model, flush_every=5):
        for s in range(steps):
            g = torch.Generator().manual_seed(s)
            ids = torch.randint(0, V, (4, 7), generator=g)
            nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
    return opt


@pytest.mark.parametrize("granularity", ["head", "vocab"])
def test_record_distill_apply_per_slice(tmp_path, granularity):
    opt = record(tmp_path / "t", granularity)
    meta = read_metadata(tmp_path / "t")
    groups = {g["name"]: g for g in meta["groups"]}
    assert meta["granularity"] == granularity
    assert groups["blocks.0.attn.query.weight[head 3]"]["kind"] == "Q"
    assert groups["blocks.0.attn.query.weight[head 3]"]["shape"] == [2, 8]
    assert groups["blocks.0.attn.out.weight[head 0]"]["kind"] == "attn_out"
    if granularity == "vocab":
        assert groups["head.decoder.weight[rows 20-22]"] == {**groups["head.decoder.weight[rows 20-22]"],
                                                            "kind": "output", "shape": [3, 8], "numel": 24}
        assert groups["embeddings.word.weight[rows 0-9]"]["kind"] == "embedding"
    assert set(read_trace(tmp_path / "t")["group"]) == set(opt.group_names)

    static = distill(tmp_path / "t", window=6)
    assert set(static.multipliers) == set(opt.group_names)
    key_bias = static.group_sources["blocks.0.attn.key.bias[head 2]"]
    assert "degenerate" in key_bias.flags  # the key bias has no true gradient, per head as per tensor
    sched = distill(tmp_path / "t", window=4, schedule=True)
    assert "blocks.0.attn.key.weight[head 1]" in sched.schedule
    model = gpt()
    for corr in (static, sched):  # both apply to the model the trace came from
        applied = apply(corr, model, 0.1)
        assert not applied.missing and not applied.unknown
        scaled = {g["name"]: g for g in applied.param_groups if "lr_scale" in g}
        assert "blocks.0.attn.query.weight" in scaled
    q = scaled["blocks.0.attn.query.weight"]
    assert "lr_scale_schedule" in q
    q["lr_scale_schedule"].at(0)
    want = [sched.schedule[f"blocks.0.attn.query.weight[head {h}]"][0][1] * sched.multipliers.get(
        f"blocks.0.attn.query.weight[head {h}]", 1.0) for h in range(4)]
    got = q["lr_scale"][::2, 0].tolist()
    assert got == pytest.approx(want, rel=1e-6) and all(math.isfinite(v) for v in got)
