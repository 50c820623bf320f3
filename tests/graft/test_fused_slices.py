"""Fused Q/K/V tensors (GPT-2's ``c_attn``) grafted, recorded, distilled and applied per slice."""
import math

import pytest
import torch

from graftlab import Graft, Recorder, read_trace
from graftlab.errors import GraftlabError
from graftlab.graft.partition import make_partition
from graftlab.graft.slicing import fused_layout

transformers = pytest.importorskip("transformers")


def gpt2(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=12, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (4, 16), generator=g)


def loss_step(model, opt, seed):
    ids = batch(seed)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_partition_splits_c_attn_into_named_thirds():
    assert fused_layout("transformer.h.0.attn.c_attn.weight", (12, 36)) == (1, ("q", "k", "v"))
    assert fused_layout("transformer.h.0.attn.c_attn.bias", (36,)) == (0, ("q", "k", "v"))
    assert fused_layout("transformer.h.0.attn.c_proj.weight", (12, 12)) is None
    part = make_partition(["a.c_attn.weight", "a.c_attn.bias", "b.weight"], "layer", [(4, 6), (6,), (3,)], "fused")
    assert part.group_names == ("a.c_attn.weight[q]", "a.c_attn.weight[k]", "a.c_attn.weight[v]",
                                "a.c_attn.bias[q]", "a.c_attn.bias[k]", "a.c_attn.bias[v]", "b.weight")
    w = torch.arange(24.0).reshape(4, 6)
    q, k, v = part.units([w, torch.zeros(6), torch.zeros(3)])[:3]
    assert torch.equal(k, w[:, 2:4]) and k.data_ptr() == w[:, 2:4].data_ptr()  # views, no copies
    whole = make_partition(["a.c_attn.weight"], "layer", [(4, 6)], None)
    assert whole.group_names == ("a.c_attn.weight",) and not whole.split
    with pytest.raises(GraftlabError, match="unknown split"):
        make_partition(["a"], "layer", [(1,)], "thirds")


def _reference_step(model, seed, m_lr, d_lr):
    """M#D by hand in float64, each Q/K/V third its own group: Adam's and SGD's first steps."""
    ids = batch(seed)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        m_step = -m_lr * g / (g.abs() + 1e-8)  # Adam's first step (bias-corrected m/sqrt(v))
        d_step = -d_lr * g
        layout = fused_layout(name, tuple(p.shape))
        pieces = [(None, slice(None))] if layout is None else \
            [(lab, (slice(None),) * layout[0] + (slice(i * p.shape[layout[0]] // 3, (i + 1) * p.shape[layout[0]] // 3),))
             for i, lab in enumerate(layout[1])]
        new = p.detach().clone()
        for lab, idx in pieces:
            nm, nd = m_step[idx].norm(), d_step[idx].norm()
            new[idx] = p.detach()[idx] + (nm / nd) * d_step[idx]
            out[name if lab is None else f"{name}[{lab}]"] = float(nm / nd)
        p.grad = None
        out[name + "#new"] = new
    return out


@pytest.mark.parametrize("path", ["direct", "generic"])
def test_grafting_per_slice_is_exact_in_float64(path):
    model, ref_model = gpt2(dtype=torch.float64), gpt2(dtype=torch.float64)
    want = _reference_step(ref_model, 1, 1e-3, 0.1)
    opt = Graft(torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.SGD(model.parameters(), lr=0.1),
                names=model, path=path)
    assert opt.path == path
    loss_step(model, opt, 1)
    names = list(opt.group_names)
    assert "transformer.h.1.attn.c_attn.weight[v]" in names and "transformer.h.0.attn.c_attn.bias[q]" in names
    assert "transformer.h.0.attn.c_attn.weight" not in names
    ratios = opt.last_stats[2].tolist()
    for g, r in zip(names, ratios):
        assert r == pytest.approx(want[g], rel=1e-10), g
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name + "#new"], rtol=1e-12, atol=1e-14)
    # the three thirds of one tensor get three different ratios
    q, k, v = (want[f"transformer.h.0.attn.c_attn.weight[{x}]"] for x in "qkv")
    assert len({round(q, 8), round(k, 8), round(v, 8)}) == 3


def test_split_none_keeps_whole_tensors():
    model = gpt2()
    opt = Graft(torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.SGD(model.parameters(), lr=0.1),
                names=model, split=None)
    assert "transformer.h.0.attn.c_attn.weight" in opt.group_names
    assert not any("[" in g for g in opt.group_names)


def test_record_distill_and_apply_per_slice(tmp_path):
    from graftlab.corrections import apply, save
    from graftlab.distill.pipeline import distill
    from graftlab.trace import read_metadata

    model = gpt2()
    opt = Graft(torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.SGD(model.parameters(), lr=0.1),
                names=model)
    with Recorder(opt, tmp_path / "t", model=model, flush_every=4) as rec:
        for s in range(8):
            loss_step(model, opt, s)
    meta = read_metadata(tmp_path / "t")
    groups = {g["name"]: g for g in meta["groups"]}
    assert groups["transformer.h.1.attn.c_attn.weight[k]"]["kind"] == "K"
    assert groups["transformer.h.1.attn.c_attn.weight[k]"]["shape"] == [12, 12]
    assert groups["transformer.h.1.attn.c_attn.bias[v]"]["kind"] == "V"
    df = read_trace(tmp_path / "t")
    assert set(df["group"]) == set(opt.group_names)
    corr = distill(tmp_path / "t", window=4)
    assert {"transformer.h.0.attn.c_attn.weight[q]", "transformer.h.0.attn.c_attn.weight[v]"} <= set(corr.multipliers)
    assert corr.group_sources["transformer.h.0.attn.c_attn.weight[q]"].kind == "Q"
    save(corr, tmp_path / "c.json")

    fresh = gpt2(dtype=torch.float64)  # float64: the check below is exact, not float32's rounding x factor
    applied = apply(corr, list(fresh.named_parameters()), 0.1)
    assert not applied.missing and not applied.unknown
    by_name = {g["name"]: g for g in applied.param_groups}
    w = by_name["transformer.h.0.attn.c_attn.weight"]
    scale = w["lr_scale"]  # the per-slice factors as a multiplier on the fused tensor's update
    f = [corr.multipliers[f"transformer.h.0.attn.c_attn.weight[{x}]"] for x in "qkv"]
    assert w["lr"] == pytest.approx(0.1) and scale.shape == (1, 36)
    assert scale[0, :12].eq(f[0]).all() and scale[0, 12:24].eq(f[1]).all() and scale[0, 24:].eq(f[2]).all()
    # training with the corrections: SGD's step on each third is lr * factor * grad
    sgd = torch.optim.SGD(applied.param_groups, lr=0.1)
    hooks = applied.register(sgd)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    ids = batch(0)
    fresh(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in fresh.named_parameters()}
    sgd.step()
    for n, p in fresh.named_parameters():
        g = by_name[n]
        want = before[n] - g["lr"] * (g["lr_scale"] if "lr_scale" in g else 1.0) * grads[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-12)
    hooks.remove()
