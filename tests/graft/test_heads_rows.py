"""Grafting per attention head and per vocabulary row block (``granularity="head"`` / ``"vocab"``):
group names, exactness against a float64 step computed by hand, and the paper's algebra per slice
on the direct, generic and fused paths."""
import pytest
import torch
from torch import nn

from graftlab import Graft
from graftlab.errors import GraftlabError
from graftlab.graft import fused
from graftlab.graft.partition import make_partition
from graftlab.graft.slicing import Slicing, parse_group, slicing_for
from graftlab.graft.units import UnitPlan
from graftlab.kinds import classify
from graftlab.tasks.gpt import GPT, GPTConfig

V, D, H = 23, 8, 4  # a vocabulary that 5-row blocks do not divide: the last block is shorter


def gpt(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, hidden=D, layers=1, heads=H, intermediate=16, seq_len=6)).to(dtype)


def loss_of(model, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 7), generator=g)
    return nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def hand_slices(name, shape, granularity, block=5):
    """The slices of the task's GPT by hand: (label, index) pairs, or None for the whole tensor."""
    if granularity == "vocab" and name in ("embeddings.word.weight", "head.decoder.weight"):
        out = []
        for a in range(0, V, block):
            b = min(a + block, V)
            out.append((f"row {a}" if b == a + 1 else f"rows {a}-{b - 1}", (slice(a, b),)))
        return out
    leaf = name.split(".")
    if leaf[-2] in ("query", "key", "value"):
        n = shape[0] // H
        return [(f"head {h}", (slice(h * n, (h + 1) * n),)) for h in range(H)]
    if leaf[-2] == "out" and leaf[-1] == "weight":
        n = shape[1] // H
        return [(f"head {h}", (slice(None), slice(h * n, (h + 1) * n))) for h in range(H)]
    return None


def reference(model, granularity, seed, m_lr, d_lr):
    """Adam#SGD's first step in float64 by hand: per-slice norms, ratios and new weights."""
    model.zero_grad()
    loss_of(model, seed).backward()
    ratios, new = {}, {}
    for name, p in model.named_parameters():
        g = p.grad
        m_step, d_step = -m_lr * g / (g.abs() + 1e-8), -d_lr * g  # Adam's first step, SGD's
        pieces = hand_slices(name, tuple(p.shape), granularity) or [(None, (slice(None),))]
        w = p.detach().clone()
        for label, idx in pieces:
            nm, nd = m_step[idx].norm(), d_step[idx].norm()
            w[idx] = p.detach()[idx] + (nm / nd) * d_step[idx]
            ratios[name if label is None else f"{name}[{label}]"] = float(nm / nd)
        new[name] = w
    return ratios, new


@pytest.fixture
def eager_fused(monkeypatch):
    monkeypatch.setattr(fused, "COMPILE", False)  # the fused passes' very functions, uncompiled


def test_group_names_show_the_slice():
    model = gpt(dtype=torch.float32)
    adam, sgd = torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1)
    head = Graft(adam, sgd, granularity="head", names=model).group_names
    assert "blocks.0.attn.query.weight[head 3]" in head and "blocks.0.attn.key.bias[head 0]" in head
    assert "blocks.0.attn.out.weight[head 2]" in head and "blocks.0.attn.out.bias" in head  # output bias: whole
    assert "head.decoder.weight" in head and "blocks.0.ffn.fc1.weight" in head
    vocab = Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1),
                  granularity="vocab", row_block=5, names=model).group_names
    assert "head.decoder.weight[rows 0-4]" in vocab and "head.decoder.weight[rows 20-22]" in vocab
    assert "embeddings.word.weight[rows 5-9]" in vocab and "embeddings.position.weight" in vocab
    assert "blocks.0.attn.value.weight[head 1]" in vocab
    one = make_partition(["embeddings.word.weight", "blocks.0.attn.query.weight"], "vocab", [(3, 4), (4, 4)],
                         slicing=Slicing(default_heads=2))
    assert one.group_names[:3] == ("embeddings.word.weight[row 0]", "embeddings.word.weight[row 1]",
                                   "embeddings.word.weight[row 2]")
    kinds = {g: classify(g).kind for g in vocab}
    assert kinds["blocks.0.attn.key.weight[head 1]"] == "K" and kinds["head.decoder.weight[rows 0-4]"] == "output"
    assert kinds["embeddings.word.weight[rows 5-9]"] == "embedding"
    assert parse_group("x.c_attn.weight[q head 3]") == ("x.c_attn.weight", "q", 3, None)
    assert parse_group("h.decoder.weight[rows 0-99]") == ("h.decoder.weight", None, None, (0, 100))
    assert parse_group("h.decoder.weight") is None


@pytest.mark.parametrize("granularity", ["head", "vocab"])
@pytest.mark.parametrize("path", ["direct", "generic", "fused"])
def test_per_slice_step_is_exact_in_float64(granularity, path, eager_fused):
    model, ref = gpt(), gpt()
    want, new = reference(ref, granularity, 1, 1e-3, 0.1)
    opt = Graft(torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.SGD(model.parameters(), lr=0.1),
                granularity=granularity, row_block=5 if granularity == "vocab" else 1, names=model, path="generic" if path == "generic" else "auto",
                fused=path == "fused")
    loss_of(model, 1).backward()
    opt.step()
    assert set(opt.group_names) == set(want)
    for g, r in zip(opt.group_names, opt.last_stats[2].tolist()):
        assert r == pytest.approx(want[g], rel=1e-9), g
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), new[name], rtol=1e-12, atol=1e-14)
    heads = [want[f"blocks.0.attn.query.weight[head {h}]"] for h in range(H)]
    assert len({round(r, 6) for r in heads}) == H  # the heads do get ratios of their own


def _train(model, opt, steps=3):
    for s in range(steps):
        opt.zero_grad()
        loss_of(model, s).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("granularity", ["head", "vocab"])
@pytest.mark.parametrize("path", ["direct", "generic", "fused"])
def test_algebra_per_slice(granularity, path, eager_fused):
    kw = dict(granularity=granularity, row_block=3 if granularity == "vocab" else 1, path="generic" if path == "generic" else "auto",
              fused=path == "fused")

    def graft(model, m, d):
        return Graft(m(model.parameters()), d(model.parameters()), names=model, **kw)

    adam = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    model = gpt()
    alone = _train(model, adam(model.parameters()))
    model = gpt()
    both = _train(model, graft(model, adam, adam))  # A#A = A
    for a, b in zip(alone, both):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    # M#D = M when D differs from M only by its learning-rate schedule
    model = gpt()
    sgd = _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    model = gpt()
    opt = graft(model, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                lambda ps: torch.optim.SGD(ps, lr=0.003, momentum=0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt.direction, lambda t: 1.0 / (1 + t))
    for s in range(3):
        opt.zero_grad()
        loss_of(model, s).backward()
        opt.step()
        sched.step()
    for a, b in zip(sgd, model.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=1e-10, atol=1e-12)


def test_multihead_attention_in_proj_split_into_q_k_v_heads():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).double()
    opt = Graft(torch.optim.Adam(mha.parameters(), lr=1e-3), torch.optim.SGD(mha.parameters(), lr=0.1),
                granularity="head", names=mha)
    names = opt.group_names
    assert "in_proj_weight[q head 0]" in names and "in_proj_weight[v head 1]" in names
    assert "in_proj_bias[k head 1]" in names and "out_proj.weight[head 1]" in names
    assert classify("in_proj_weight[k head 1]").kind == "K"
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    mha(x, x, x)[0].pow(2).sum().backward()
    g = {n: p.grad.clone() for n, p in mha.named_parameters()}
    opt.step()
    ratios = dict(zip(names, opt.last_stats[2].tolist()))
    gk = g["in_proj_weight"][8 + 4 : 8 + 8]  # K's rows, head 1
    want = (1e-3 * (gk / (gk.abs() + 1e-8))).norm() / (0.1 * gk).norm()
    assert ratios["in_proj_weight[k head 1]"] == pytest.approx(float(want), rel=1e-10)
    go = g["out_proj.weight"][:, 4:]  # the output projection's input columns of head 1
    want = (1e-3 * (go / (go.abs() + 1e-8))).norm() / (0.1 * go).norm()
    assert ratios["out_proj.weight[head 1]"] == pytest.approx(float(want), rel=1e-10)
    layer = Graft(torch.optim.Adam(mha.parameters()), torch.optim.SGD(mha.parameters(), lr=0.1), names=mha)
    assert "in_proj_weight[k]" in layer.group_names  # layer granularity: Q/K/V thirds, as GPT-2's c_attn


def test_heads_from_the_argument_and_grouped_query_attention():
    lin = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "k_proj": nn.Linear(8, 4), "o_proj": nn.Linear(8, 8)})
    pairs = [(f"attn.{n}", p) for n, p in lin.named_parameters()]
    ps = [p for _, p in pairs]
    with pytest.raises(GraftlabError, match="pass heads="):
        Graft(torch.optim.Adam(ps), torch.optim.SGD(ps, lr=0.1), granularity="head", names=pairs)
    opt = Graft(torch.optim.Adam(ps), torch.optim.SGD(ps, lr=0.1), granularity="head", names=pairs,
                heads={"attn.q_proj.weight": 4, "attn.q_proj.bias": 4, "attn.k_proj.weight": 2,
                       "attn.k_proj.bias": 2, "attn.o_proj.weight": 4})
    assert "attn.k_proj.weight[head 1]" in opt.group_names and "attn.k_proj.weight[head 2]" not in opt.group_names
    assert "attn.o_proj.weight[head 3]" in opt.group_names

    class GQA(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.num_key_value_heads = 4, 2
            self.q_proj, self.k_proj, self.o_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 8)

    model = nn.ModuleDict({"attn": GQA()})
    s = slicing_for(model)
    assert s.heads["attn.q_proj.weight"] == 4 and s.kv_heads["attn.k_proj.weight"] == 2
    opt = Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1),
                granularity="head", names=model)
    assert "attn.k_proj.weight[head 1]" in opt.group_names and "attn.q_proj.weight[head 3]" in opt.group_names
    with pytest.raises(GraftlabError, match="not divisible"):
        Graft(torch.optim.Adam(ps), torch.optim.SGD(ps, lr=0.1), granularity="head", names=pairs, heads=3)
    with pytest.raises(GraftlabError, match="row_block"):
        Graft(torch.optim.Adam(ps), torch.optim.SGD(ps, lr=0.1), granularity="vocab", names=pairs, heads=2,
              row_block=0)
    mlp = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(GraftlabError, match="no attention tensor"):
        Graft(torch.optim.Adam(mlp.parameters()), torch.optim.SGD(mlp.parameters(), lr=0.1), granularity="head",
              names=mlp)


def test_unit_plan_matches_units_one_by_one():
    part = make_partition(["embeddings.word.weight", "blocks.0.attn.out.weight", "b"], "vocab",
                          [(11, 6), (6, 6), (3,)], slicing=Slicing(default_heads=3, row_block=2))
    ts = [torch.randn(11, 6), torch.randn(6, 6), torch.randn(3)]
    plan = UnitPlan(part.unit_tensor, part.slices, torch.device("cpu"))
    # five 2-row blocks merged into one run; the last row, 3 heads and the whole tensor one by one
    assert len(plan.runs) == 1 and plan.runs[0][4] == 5 and len(plan.singles) == 5
    one_by_one = torch.stack([u.norm() for u in part.units(ts)])
    torch.testing.assert_close(plan.norms(ts, torch.float32), one_by_one)
    f = torch.rand(len(part.group_names))
    want = [t.clone() for t in ts]
    for u, fu in zip(part.units(want), f):
        u.mul_(fu)
    plan.mul_(ts, f)
    for a, b in zip(ts, want):
        torch.testing.assert_close(a, b)


def test_gpt2_conv1d_heads():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=30, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).double()
    opt = Graft(torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.SGD(model.parameters(), lr=0.1),
                granularity="vocab", row_block=10, names=model)
    names = opt.group_names
    assert "transformer.h.0.attn.c_attn.weight[k head 1]" in names
    assert "transformer.h.0.attn.c_proj.weight[head 1]" in names
    assert "transformer.wte.weight[rows 20-29]" in names  # tied with lm_head: one tensor, named once
    ids = torch.randint(0, 30, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    ratios = dict(zip(names, opt.last_stats[2].tolist()))

    def ratio(x):
        return float((1e-3 * (x / (x.abs() + 1e-8))).norm() / (0.1 * x).norm())

    # Conv1D stores (in, out): K's head 1 is columns 8 + 4 .. 8 + 8 of c_attn, c_proj's head 1 rows 4..8
    assert ratios["transformer.h.0.attn.c_attn.weight[k head 1]"] == pytest.approx(
        ratio(g["transformer.h.0.attn.c_attn.weight"][:, 12:16]), rel=1e-10)
    assert ratios["transformer.h.0.attn.c_proj.weight[head 1]"] == pytest.approx(
        ratio(g["transformer.h.0.attn.c_proj.weight"][4:8]), rel=1e-10)
