"""``Graft(..., fused=True)`` (graftlab.graft.fused) against the eager direct path, on every pair it supports.

The math is checked uncompiled (``graftlab.graft.fused.COMPILE = False`` runs the very functions
``torch.compile`` compiles) in float64 against ``Graft(path="direct")``, and in float32 against the
float64 run; the slow tests compile the passes (inductor) on a small model and check that the
compiled code allocates nothing parameter-sized.
"""
from __future__ import annotations

import copy
import math
import pickle
import re

import pytest
import torch
from torch import nn

from graftlab import Graft

from graftlab.graft import fused
from graftlab.errors import GraftlabError
from graftlab.graft.fused import FusedDirect
from tests.models import batches, loss_fn, make

torch.set_num_threads(1)

# every optimizer the direct path serves, with the settings that change its kernel
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.05)),
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, maximize=True, decoupled_weight_decay=True, weight_decay=0.1)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.05, lr_decay=1e-3, weight_decay=1e-3, initial_accumulator_value=0.1)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-2)),
    "rmsprop-centered": (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True, weight_decay=1e-3)),
}
PAIRS = [(m, d) for m in OPTIMIZERS for d in OPTIMIZERS]


@pytest.fixture
def eager(monkeypatch):
    """The fused passes uncompiled: the same functions, without inductor's minutes of compiling."""
    monkeypatch.setattr(fused, "COMPILE", False)


def opt(name: str, params, **over) -> torch.optim.Optimizer:
    cls, kw = OPTIMIZERS[name]
    return cls(params, **{**kw, **over})


def run(model: nn.Module, m_name: str, d_name: str, granularity: str, data, **graft_kw):
    """Train ``model``: per-step flat weights, per-step (3, G) stats, and the Graft."""
    params = list(model.parameters())
    g = Graft(opt(m_name, params), opt(d_name, params), granularity=granularity, names=model, **graft_kw)
    weights, stats = [], []
    for batch in data:
        g.zero_grad()
        loss_fn(model, batch).backward()
        g.step()
        weights.append(torch.cat([p.detach().reshape(-1) for p in params]))
        stats.append(g.last_stats.clone())
    return weights, stats, g


def assert_close_runs(a, b, rtol, atol):
    for t, (x, y) in enumerate(zip(a[0], b[0])):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, t=t: f"weights, step {t}: {m}")
    for t, (x, y) in enumerate(zip(a[1], b[1])):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m, t=t: f"stats, step {t}: {m}")


@pytest.mark.parametrize("m_name,d_name", PAIRS)
@pytest.mark.parametrize("granularity", ["layer", "global", "coordinate"])
def test_fused_equals_direct_path_in_float64(eager, m_name, d_name, granularity):
    data = batches("mlp", 4)
    got = run(make("mlp"), m_name, d_name, granularity, data, fused=True)
    ref = run(make("mlp"), m_name, d_name, granularity, data, path="direct")
    assert got[2].fused and not ref[2].fused
    assert_close_runs(got, ref, rtol=1e-10, atol=1e-12)
    # the children's states (and step counters) are the ones the direct path leaves behind
    for role in ("magnitude", "direction"):
        fs, ds = (getattr(g, role).state_dict()["state"] for g in (got[2], ref[2]))
        assert fs.keys() == ds.keys()
        for k in fs:
            assert fs[k].keys() == ds[k].keys()
            for key in fs[k]:
                torch.testing.assert_close(fs[k][key], ds[k][key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m_name,d_name", [("adam", "sgd-momentum"), ("adamw", "adagrad"), ("rmsprop-centered", "adam")])
def test_fused_float32_matches_float64_reference(eager, m_name, d_name):
    data64 = batches("block", 5)
    data32 = [tuple(x.float() for x in b) for b in data64]
    ref = run(make("block"), m_name, d_name, "layer", data64, path="direct")
    got = run(make("block", dtype=torch.float32), m_name, d_name, "layer", data32, fused=True)
    named = list(make("block").named_parameters())
    # key.bias has a true gradient of zero (softmax ignores it): its D step and ratio are rounding noise
    keep = [i for i, (n, _) in enumerate(named) if n != "key.bias"]
    flat_keep = torch.cat([torch.full((p.numel(),), n != "key.bias") for n, p in named])
    assert got[2].last_stats.dtype == torch.float32
    for t, (x, y) in enumerate(zip(got[1], ref[1])):
        torch.testing.assert_close(x[:, keep].double(), y[:, keep], rtol=2e-4, atol=1e-7, msg=lambda m, t=t: f"step {t}: {m}")
    torch.testing.assert_close(got[0][-1][flat_keep].double(), ref[0][-1][flat_keep], rtol=1e-4, atol=1e-5)


def test_missing_gradients_and_zero_steps_keep_weights(eager):
    model = make("mlp")
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    scalar = nn.Parameter(torch.ones((), dtype=torch.float64))
    names = list(model.named_parameters()) + [("unused", unused), ("scalar", scalar)]
    ps = [p for _, p in names]
    g = Graft(torch.optim.Adam(ps, lr=1e-2), torch.optim.SGD(ps, lr=0.1, momentum=0.9), names=names, fused=True)
    for batch in batches("mlp", 3):
        g.zero_grad()
        (loss_fn(model, batch) + 0.0 * scalar).backward()
        model.fc2.bias.grad.zero_()  # D's step on this group is exactly zero
        g.step()
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))
    assert unused not in g.magnitude.state and unused not in g.direction.state
    col = g.group_names.index
    assert g.last_stats[1, col("fc2.bias")] == 0 and g.last_stats[1, col("scalar")] == 0
    assert torch.isnan(g.last_stats[2, col("unused")])  # 0 / 0: no gradient, no step
    assert all(torch.isfinite(p).all() for p in ps)


def test_fused_graft_keeps_no_buffer_until_a_step_takes_the_generic_path(eager):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).double()
    twin = copy.deepcopy(model)
    grafts = [
        Graft(torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.Adagrad(m.parameters(), lr=0.1),
              granularity="coordinate", names=m, **kw)
        for m, kw in ((model, {"fused": True}), (twin, {}))
    ]
    assert grafts[0]._buf is None and grafts[0]._abs_m is None and grafts[0]._scratch is None
    idx = torch.tensor([1, 3, 3])
    for sparse in (False, True):
        for m, g in zip((model, twin), grafts):
            g.zero_grad()
            m[0].sparse = sparse
            m(idx).square().sum().backward()
            g.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert grafts[0]._buf is not None and grafts[0]._abs_m is not None  # the sparse step went the generic way


def test_hooks_schedulers_and_state_dicts_work_as_on_the_direct_path(eager):
    model = make("mlp")
    g = Graft(opt("adam", model.parameters()), opt("sgd-momentum", model.parameters()), names=model, fused=True)
    calls = []
    g.magnitude.register_step_pre_hook(lambda o, a, k: calls.append("m pre"))
    g.direction.register_step_post_hook(lambda o, a, k: calls.append("d post"))
    g.register_step_post_hook(lambda o, a, k: calls.append("graft post"))
    sched = torch.optim.lr_scheduler.LambdaLR(g, lambda t: 0.5**t)
    data = batches("mlp", 4)
    for batch in data[:2]:
        g.zero_grad()
        loss_fn(model, batch).backward()
        g.step()
        sched.step()
    assert calls == ["m pre", "d post", "graft post"] * 2
    assert g.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    # a fused Graft's state continues on the direct path, and the other way round
    twin = copy.deepcopy(model)
    h = Graft(opt("adam", twin.parameters()), opt("sgd-momentum", twin.parameters()), names=twin)
    h.load_state_dict(copy.deepcopy(g.state_dict()))  # as from a file: tensors not shared
    copy_ = pickle.loads(pickle.dumps(g))
    assert copy_.fused and "fused=True" in repr(copy_)
    for batch in data[2:]:
        for m, o in ((model, g), (twin, h)):
            o.zero_grad()
            loss_fn(m, batch).backward()
            o.step()
        torch.testing.assert_close(torch.cat([p.reshape(-1) for p in model.parameters()]),
                                   torch.cat([p.reshape(-1) for p in twin.parameters()]), rtol=1e-10, atol=1e-12)


def test_complex_parameters_count_as_pairs_of_reals(eager):
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.complex128)
    grads = [torch.randn(5, 3, dtype=torch.complex128) for _ in range(3)]
    out = []
    for kw in ({"fused": True}, {"path": "direct"}):
        p = nn.Parameter(w.clone())
        g = Graft(torch.optim.Adam([p], lr=1e-2), torch.optim.SGD([p], lr=0.1, momentum=0.9), **kw)
        for grad in grads:
            p.grad = grad.clone()
            g.step()
        out.append((p.detach().clone(), g.last_stats.clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-10, atol=1e-12)


def test_dynamic_buckets_flatten_channels_last_weights_in_memory_order(eager):
    conv = nn.Conv2d(3, 4, 3).double().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    runs = []
    for kw in ({"fused": True}, {"path": "direct"}):
        net = copy.deepcopy(conv)
        g = Graft(torch.optim.Adam(net.parameters(), lr=1e-2), torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), **kw)
        if g.fused:  # dynamic sizes (Graft's default is static): 1-D views in memory order
            g._fused = FusedDirect(g.magnitude, g.direction, g.params, norm_dtype=torch.float64, dynamic=True, bucket_size=2)
        for _ in range(3):
            g.zero_grad()
            net(x).square().sum().backward()
            g.step()
        if g.fused:
            assert g._fused._buckets[0].ps[0].shape == (conv.weight.numel(),)
        runs.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_needs_the_direct_path_and_direct_rules():
    p = [nn.Parameter(torch.ones(3))]
    with pytest.raises(GraftlabError, match="fused=True needs the direct path for both children: no direct rule for Adamax"):
        Graft(torch.optim.Adamax(p), torch.optim.SGD(p, lr=0.1), fused=True)
    with pytest.raises(GraftlabError, match="path='generic' was chosen"):
        Graft(torch.optim.Adam(p), torch.optim.SGD(p, lr=0.1), fused=True, path="generic")
    with pytest.raises(GraftlabError, match="no direct rule for Adam"):
        Graft(torch.optim.SGD(p, lr=0.1), torch.optim.Adam(p, capturable=True), fused=True)
    with pytest.raises(GraftlabError, match="bucket_size"):
        FusedDirect(torch.optim.SGD(p, lr=0.1), torch.optim.SGD(p, lr=0.1), p, bucket_size=0)
    with pytest.raises(GraftlabError, match="no rule for the magnitude optimizer Adamax"):
        FusedDirect(torch.optim.Adamax(p), torch.optim.SGD(p, lr=0.1), p)


def _small_model():
    torch.manual_seed(0)  # every tensor larger than the (2, n_tensors) norms the passes return
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3, bias=False)).double()


@pytest.mark.slow
@pytest.mark.parametrize("m_name,d_name,granularity,dynamic", [
    ("adamw", "sgd-nesterov", "global", False),
    ("rmsprop-centered", "adagrad", "coordinate", True),
])
def test_compiled_passes_equal_the_eager_direct_path(m_name, d_name, granularity, dynamic):
    """inductor-compiled passes, float64 (so that only the order of float operations may differ)."""
    from torch._inductor.utils import run_and_get_code

    data = batches("mlp", 3)

    def fused_run():
        model = _small_model()
        params = list(model.parameters())
        g = Graft(opt(m_name, params), opt(d_name, params), granularity=granularity, names=model, fused=True)
        if dynamic:
            g._fused = FusedDirect(g.magnitude, g.direction, params, elementwise=g.partition.elementwise,
                                   norm_dtype=torch.float64, dynamic=True, bucket_size=2)
        weights, stats = [], []
        for batch in data:
            g.zero_grad()
            loss_fn(model, batch).backward()
            g.step()
            weights.append(torch.cat([p.detach().reshape(-1) for p in params]))
            stats.append(g.last_stats.clone())
        return weights, stats, g

    got, code = run_and_get_code(fused_run)
    assert got[2]._fused.compile
    ref = run(_small_model(), m_name, d_name, granularity, data, path="direct")
    assert_close_runs(got, ref, rtol=1e-10, atol=1e-12)
    # nothing parameter-sized is allocated: only per-tensor norms (sizes are numbers, not symbols)
    allocs = re.findall(r"empty_strided_cpu\(\(([^)]*)\)", "\n".join(code))
    assert allocs
    for a in allocs:
        dims = [x.strip() for x in a.split(",") if x.strip()]
        assert all(x.isdigit() for x in dims) and math.prod(int(x) for x in dims) <= 6, f"allocates ({a})"


@pytest.mark.slow
def test_compiled_training_step_traces_the_fused_passes():
    """torch.compile(graft.step) with fused=True: the passes run inside the caller's graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    a = make("mlp", dtype=torch.float32)
    b = copy.deepcopy(a)
    ga = Graft(opt("adam", a.parameters()), opt("sgd-momentum", a.parameters()), names=a, fused=True)
    gb = Graft(opt("adam", b.parameters()), opt("sgd-momentum", b.parameters()), names=b)
    step = torch.compile(ga.step, backend="eager")
    for batch in batches("mlp", 3, dtype=torch.float32):
        for model, o, s in ((a, ga, step), (b, gb, gb.step)):
            o.zero_grad()
            loss_fn(model, batch).backward()
            s()
        torch.testing.assert_close(torch.cat([p.reshape(-1) for p in a.parameters()]),
                                   torch.cat([p.reshape(-1) for p in b.parameters()]), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ga.last_stats, gb.last_stats, rtol=1e-6, atol=1e-8)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


class _QKV(nn.Module):
    """A Conv1D-style fused Q/K/V projection (``attn.c_attn``: weight (in, 3d)) and an output layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Module()
        self.attn.c_attn.weight = nn.Parameter(torch.randn(6, 9, dtype=torch.float64) * 0.3)
        self.attn.c_attn.bias = nn.Parameter(torch.randn(9, dtype=torch.float64) * 0.1)
        self.out = nn.Linear(9, 3).double()

    def forward(self, x):
        return self.out(torch.tanh(x @ self.attn.c_attn.weight + self.attn.c_attn.bias))


def _qkv_run(data, **graft_kw):
    model = _QKV()
    g = Graft(opt("adam", model.parameters()), opt("sgd-momentum", model.parameters()), names=model, **graft_kw)
    for batch in data:
        g.zero_grad()
        loss_fn(model, batch).backward()
        g.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), g


def test_slices_of_fused_qkv_tensors_are_units_of_their_own(eager):
    data = batches("mlp", 3)
    w, g = _qkv_run(data, fused=True)
    w_ref, ref = _qkv_run(data, path="direct")
    assert g.partition.split and "attn.c_attn.weight[k]" in g.group_names and g.last_stats.shape == (3, 8)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g.last_stats, ref.last_stats, rtol=1e-10, atol=1e-12)
