"""The fused direct step (graftlab.fused) against the eager direct path, on every pair it supports.

The math is checked uncompiled (``compile=False`` runs the very functions ``torch.compile`` would
compile) in float64 against ``Graft(path="direct")``, and in float32 against the float64 run; two
slow tests compile the passes (inductor) on a small model.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from graftlab import Graft
from graftlab.errors import GraftlabError
from graftlab.fused import FusedDirect, graft_factors, group_norms
from graftlab.partition import make_partition, name_parameters
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


def opt(name: str, params, **over) -> torch.optim.Optimizer:
    cls, kw = OPTIMIZERS[name]
    return cls(params, **{**kw, **over})


def maximizing(name: str) -> bool:
    return OPTIMIZERS[name][1].get("maximize", False)


def fused_run(model: nn.Module, m_name: str, d_name: str, granularity: str, data, compile: bool = False, **kw):
    """Train with the fused step: returns per-step flat weights and (3, G) stats."""
    params = list(model.parameters())
    m, d = opt(m_name, params), opt(d_name, params)
    part = make_partition(name_parameters(params, model), granularity)
    norm_dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    fused = FusedDirect(m, d, params, elementwise=part.elementwise, norm_dtype=norm_dtype, compile=compile, **kw)
    index = torch.tensor(part.tensor_group)
    stats = torch.empty((3, len(part.group_names)), dtype=norm_dtype)
    weights, all_stats = [], []
    for batch in data:
        for p in params:
            p.grad = None
        loss_fn(model, batch).backward()
        with torch.no_grad():
            sq = fused.squared_norms()
            norms = group_norms(sq, index, len(part.group_names), part.one_tensor_per_group)
            fused.apply(graft_factors(norms, index, stats, part.one_tensor_per_group))
        weights.append(torch.cat([p.detach().reshape(-1) for p in params]))
        all_stats.append(stats.clone())
    return weights, all_stats, (m, d)


def direct_run(model: nn.Module, m_name: str, d_name: str, granularity: str, data):
    params = list(model.parameters())
    m, d = opt(m_name, params), opt(d_name, params)
    g = Graft(m, d, granularity=granularity, names=model, path="direct")
    weights, all_stats = [], []
    for batch in data:
        g.zero_grad()
        loss_fn(model, batch).backward()
        g.step()
        weights.append(torch.cat([p.detach().reshape(-1) for p in params]))
        all_stats.append(g.last_stats.clone())
    return weights, all_stats, (m, d)


def assert_close_runs(a, b, rtol, atol, skip_ratio=None):
    for t, (x, y) in enumerate(zip(a[0], b[0])):
        torch.testing.assert_close(x, y.to(x.dtype), rtol=rtol, atol=atol, msg=lambda m: f"weights, step {t}: {m}")
    for t, (x, y) in enumerate(zip(a[1], b[1])):
        keep = slice(None) if skip_ratio is None else skip_ratio
        torch.testing.assert_close(x[:2], y[:2].to(x.dtype), rtol=rtol, atol=atol, msg=lambda m: f"norms, step {t}: {m}")
        torch.testing.assert_close(
            x[2, keep], y[2, keep].to(x.dtype), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"ratios, step {t}: {m}"
        )


@pytest.mark.parametrize("m_name,d_name", PAIRS)
@pytest.mark.parametrize("granularity", ["layer", "global", "coordinate"])
def test_fused_equals_direct_path_in_float64(m_name, d_name, granularity):
    data = batches("mlp", 4)
    fused = fused_run(make("mlp"), m_name, d_name, granularity, data)
    direct = direct_run(make("mlp"), m_name, d_name, granularity, data)
    assert_close_runs(fused, direct, rtol=1e-10, atol=1e-12)
    # the children's states (and step counters) are the ones the direct path leaves behind
    for fo, do in zip(fused[2], direct[2]):
        fs, ds = fo.state_dict()["state"], do.state_dict()["state"]
        assert fs.keys() == ds.keys()
        for k in fs:
            assert fs[k].keys() == ds[k].keys()
            for key in fs[k]:
                torch.testing.assert_close(fs[k][key], ds[k][key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m_name,d_name", [("adam", "sgd-momentum"), ("adamw", "adagrad"), ("rmsprop-centered", "adam")])
def test_fused_float32_matches_float64_reference(m_name, d_name):
    data64 = batches("block", 5)
    data32 = [tuple(x.float() for x in b) for b in data64]
    ref = direct_run(make("block"), m_name, d_name, "layer", data64)
    got = fused_run(make("block", dtype=torch.float32), m_name, d_name, "layer", data32)
    named = list(make("block").named_parameters())
    # key.bias has a true gradient of zero (softmax ignores it): its D step and ratio are rounding noise
    keep = [i for i, (n, _) in enumerate(named) if n != "key.bias"]
    flat_keep = torch.cat([torch.full((p.numel(),), n != "key.bias") for n, p in named])
    for t, (x, y) in enumerate(zip(got[1], ref[1])):
        torch.testing.assert_close(x[:, keep].double(), y[:, keep], rtol=2e-4, atol=1e-7, msg=lambda m: f"step {t}: {m}")
    torch.testing.assert_close(got[0][-1][flat_keep].double(), ref[0][-1][flat_keep], rtol=1e-4, atol=1e-5)


def test_missing_gradients_and_zero_steps_keep_weights():
    model = make("mlp")
    data = batches("mlp", 3)
    params = list(model.parameters())
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    scalar = nn.Parameter(torch.ones((), dtype=torch.float64))  # one element: runs uncompiled, alone
    allp = params + [unused, scalar]
    m, d = torch.optim.Adam(allp, lr=1e-2), torch.optim.SGD(allp, lr=0.1, momentum=0.9)
    fused = FusedDirect(m, d, allp, norm_dtype=torch.float64, compile=False)
    index = torch.arange(len(allp))
    stats = torch.empty((3, len(allp)), dtype=torch.float64)
    for batch in data:
        for p in allp:
            p.grad = None
        (loss_fn(model, batch) + 0.0 * scalar).backward()
        model.fc2.bias.grad.zero_()
        sq = fused.squared_norms()
        fused.apply(graft_factors(group_norms(sq, index, len(allp), True), index, stats, True))
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))
    assert unused not in m.state and unused not in d.state
    assert stats[1, 3] == 0 and stats[1, 5] == 0 and torch.isnan(stats[2, 4])  # fc2.bias, scalar, unused
    assert all(torch.isfinite(p).all() for p in allp)


def test_dynamic_buckets_flatten_channels_last_weights_in_memory_order():
    conv = nn.Conv2d(3, 4, 3).double().to(memory_format=torch.channels_last)
    ref = copy.deepcopy(conv)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    runs = []
    for net, fused in ((conv, True), (ref, False)):
        ps = list(net.parameters())
        m, d = torch.optim.Adam(ps, lr=1e-2), torch.optim.SGD(ps, lr=0.1, momentum=0.9)
        g = None if fused else Graft(m, d, path="direct")
        f = FusedDirect(m, d, ps, norm_dtype=torch.float64, compile=False, dynamic=True, bucket_size=2) if fused else None
        idx = torch.arange(len(ps))
        stats = torch.empty((3, len(ps)), dtype=torch.float64)
        for _ in range(3):
            for p in ps:
                p.grad = None
            net(x).square().sum().backward()
            if fused:
                f.apply(graft_factors(group_norms(f.squared_norms(), idx, len(ps), True), idx, stats, True))
            else:
                g.step()
        runs.append([p.detach().clone() for p in ps])
        if fused:
            assert f._buckets[0].ps[0].shape == (conv.weight.numel(),)  # a 1-D view of the weight
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_unsupported_children_raise_graftlab_errors():
    p = [nn.Parameter(torch.ones(3))]
    with pytest.raises(GraftlabError, match="fused grafting has no rule for the magnitude optimizer Adamax"):
        FusedDirect(torch.optim.Adamax(p), torch.optim.SGD(p, lr=0.1), p)
    with pytest.raises(GraftlabError, match="direction optimizer Adam"):
        FusedDirect(torch.optim.SGD(p, lr=0.1), torch.optim.Adam(p, capturable=True), p)
    with pytest.raises(GraftlabError, match="bucket_size"):
        FusedDirect(torch.optim.SGD(p, lr=0.1), torch.optim.SGD(p, lr=0.1), p, bucket_size=0)
    e = torch.nn.Embedding(5, 2, sparse=True)
    f = FusedDirect(torch.optim.SGD(e.parameters(), lr=0.1), torch.optim.SGD(e.parameters(), lr=0.1), list(e.parameters()), compile=False)
    e(torch.tensor([1])).sum().backward()
    with pytest.raises(GraftlabError, match="sparse gradients"):
        f.squared_norms()


@pytest.mark.slow
@pytest.mark.parametrize(
    "m_name,d_name,granularity,kw",
    [
        ("adamw", "sgd-nesterov", "global", {}),
        ("rmsprop-centered", "adagrad", "coordinate", {"dynamic": True, "bucket_size": 2}),
    ],
)
def test_compiled_passes_equal_the_eager_direct_path(m_name, d_name, granularity, kw):
    """inductor-compiled passes, float64 (so that only the order of float operations may differ)."""
    from torch._inductor.utils import run_and_get_code

    def model():
        torch.manual_seed(0)  # every tensor larger than the (2, n_tensors) norms the passes return
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3, bias=False)).double()

    data = batches("mlp", 3)
    fused, code = run_and_get_code(fused_run, model(), m_name, d_name, granularity, data, compile=True, **kw)
    direct = direct_run(model(), m_name, d_name, granularity, data)
    assert_close_runs(fused, direct, rtol=1e-10, atol=1e-12)
    # nothing parameter-sized is allocated: only per-tensor norms (sizes are numbers, not symbols)
    allocs = re.findall(r"empty_strided_cpu\(\(([^)]*)\)", "\n".join(code))
    assert allocs
    for a in allocs:
        dims = [x.strip() for x in a.split(",") if x.strip()]
        assert all(x.isdigit() for x in dims) and math.prod(int(x) for x in dims) <= 6, f"allocates ({a})"
