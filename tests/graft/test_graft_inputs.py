"""Graft on the inputs real training stacks give it: torch.compile from the first step, complex
parameters, sparse gradients, children that edit p.grad, children that fail, named optimizers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from graftlab import Graft, GraftlabError

from tests.models import batches, loss_fn, make
from tests.graft.test_graft import flat

torch.set_num_threads(1)


# -- torch.compile --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "make_m,make_d,path",
    [
        (lambda p: torch.optim.Adam(p, lr=1e-2), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "direct"),
        (lambda p: torch.optim.SGD(p, lr=0.05), lambda p: torch.optim.Adagrad(p, lr=0.1), "generic"),
    ],
    ids=["adam#sgd-direct", "sgd#adagrad-generic"],
)
def test_compiled_step_works_from_the_first_step_and_matches_eager(make_m, make_d, path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    a = make("mlp", dtype=torch.float32)
    b = copy.deepcopy(a)
    ga = Graft(make_m(a.parameters()), make_d(a.parameters()), names=a, path=path)
    gb = Graft(make_m(b.parameters()), make_d(b.parameters()), names=b, path=path)
    compiled = torch.compile(ga.step, backend="eager")
    for batch in batches("mlp", 3, dtype=torch.float32):
        for model, opt, step in ((a, ga, compiled), (b, gb, gb.step)):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            step()
        torch.testing.assert_close(flat(a), flat(b), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ga.last_stats, gb.last_stats, rtol=1e-6, atol=1e-8)
    assert ga.steps == 3
    if path == "direct":  # the direct path compiles to one graph (the generic one runs torch.optim's steps)
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_buffers_exist_before_the_first_step():
    model = make("mlp")
    g = Graft(torch.optim.Adam(model.parameters()), torch.optim.Adagrad(model.parameters(), weight_decay=0.1),
              granularity="coordinate")
    n = len(list(model.parameters()))
    assert len(g._buf) == len(g._abs_m) == len(g._scratch) == n  # the Adagrad rule with decay needs scratch
    assert g.last_stats.shape == (3, n) and torch.isnan(g.last_stats).all()
    generic = Graft(torch.optim.Adadelta(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1))
    assert generic._grads is None  # torch.optim's steps only read gradients: no copies needed
    editing = Graft(CenteredSGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1))
    assert editing._grads is not None and len(editing._grads) == n  # copies for a step that edits them


# -- complex parameters ---------------------------------------------------------------------------
COMPLEX = {
    "sgd": lambda p, **k: torch.optim.SGD(
        p, **{"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01, **k}
    ),
    "adam": lambda p, **k: torch.optim.Adam(p, **{"lr": 1e-2, "weight_decay": 1e-2, **k}),
    "adamw": lambda p, **k: torch.optim.AdamW(p, **{"lr": 1e-2, "amsgrad": True, "maximize": True, **k}),
    "adagrad": lambda p, **k: torch.optim.Adagrad(p, **{"lr": 0.05, "weight_decay": 1e-2, **k}),
    "rmsprop": lambda p, **k: torch.optim.RMSprop(p, **{"lr": 1e-2, "centered": True, "momentum": 0.5, **k}),
}


def complex_model(dtype=torch.complex128) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(3, 2, dtype=dtype)
    model.extra = nn.Parameter(torch.randn(4, dtype=torch.float64 if dtype == torch.complex128 else torch.float32))
    return model


def complex_loss(model: nn.Module, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(t)
    x = torch.randn(5, 3, generator=g, dtype=model.weight.dtype)
    return (model(x).abs() ** 2).mean() + (model.extra * torch.arange(4.0, dtype=model.extra.dtype)).pow(2).sum()


def complex_run(model, opt, steps=5):
    out = []
    for t in range(steps):
        opt.zero_grad()
        complex_loss(model, t).backward()
        opt.step()
        out.append(torch.cat([torch.view_as_real(p.detach()).reshape(-1) if p.is_complex() else p.detach().reshape(-1)
                              for p in model.parameters()]))
    return out


@pytest.mark.parametrize("granularity", ["layer", "global"])
@pytest.mark.parametrize("name", COMPLEX)
@pytest.mark.parametrize("path", ["direct", "generic"])
def test_complex_a_graft_a_is_a(path, name, granularity):
    """The direct rules treat real and imaginary parts as torch.optim does: A#A follows torch's A."""
    ref = complex_model()
    expected = complex_run(ref, COMPLEX[name](ref.parameters()))
    model = complex_model()
    g = Graft(COMPLEX[name](model.parameters()), COMPLEX[name](model.parameters(), lr=0.3), granularity=granularity,
              names=model, path=path)
    for t, (x, y) in enumerate(zip(complex_run(model, g), expected)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, msg=lambda m: f"step {t}: {m}")


def test_complex_norms_are_norms_of_the_real_and_imaginary_parts():
    model = complex_model(torch.complex64)
    w0 = [p.detach().clone() for p in model.parameters()]
    g = Graft(torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adagrad(model.parameters(), lr=0.1),
              names=model, path="direct")
    complex_loss(model, 0).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    g.step()
    assert g.last_stats.dtype == torch.float32
    for i, (gr, p, w) in enumerate(zip(grads, model.parameters(), w0)):
        expected = (0.1 * gr).abs().pow(2).sum().sqrt()  # |z|^2 = re^2 + im^2
        torch.testing.assert_close(g.last_stats[0, i], expected.float(), rtol=1e-5, atol=0)
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), w)


@pytest.mark.parametrize("path", ["direct", "generic"])
def test_complex_coordinate_sgd_graft_adagrad_is_sgd(path):
    """Per coordinate, real and imaginary parts are separate coordinates: SGD#AdaGrad is SGD."""
    ref = complex_model()
    expected = complex_run(ref, torch.optim.SGD(ref.parameters(), lr=0.05))
    model = complex_model()
    g = Graft(torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.Adagrad(model.parameters(), lr=0.3),
              granularity="coordinate", path=path)
    for x, y in zip(complex_run(model, g), expected):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", COMPLEX)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("how", [{"path": "direct"}, {"path": "generic"}, {"fused": True}], ids=["direct", "generic", "fused"])
def test_complex_a_graft_a_steps_and_keeps_the_state_torch_keeps(name, dtype, how):
    """Through the public API, on every path: A#A' on a complex tensor steps as torch.optim's A (real
    and imaginary parts as separate reals), and the magnitude child's state holds what torch's A
    holds, in its dtypes (complex moments, a real ``step``), so a run can go on with either."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=dtype)
    grads = [torch.randn(4, 3, dtype=dtype) for _ in range(3)]
    q = nn.Parameter(w.clone())
    ref = COMPLEX[name]([q])
    p = nn.Parameter(w.clone())
    g = Graft(COMPLEX[name]([p]), COMPLEX[name]([p], lr=0.3), names=[("w", p)], **how)
    for grad in grads:
        q.grad, p.grad = grad.clone(), grad.clone()
        ref.step()
        g.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.complex64 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.detach(), q.detach(), **tol)
    assert g.last_stats.dtype == w.real.dtype and torch.isfinite(g.last_stats).all()
    mine, theirs = g.magnitude.state[p], ref.state[q]
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype, key
        torch.testing.assert_close(mine[key], value, **tol)


def test_sgd_graft_sgd_steps_a_complex64_parameter():
    """The plain case: a complex64 parameter, default path, SGD#SGD is SGD."""
    p = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    w = p.detach().clone()
    g = Graft(torch.optim.SGD([p], lr=0.1), torch.optim.SGD([p], lr=0.1), names=[("p", p)])
    p.abs().sum().backward()
    grad = p.grad.clone()
    g.step()
    torch.testing.assert_close(p.detach(), w - 0.1 * grad)
    torch.testing.assert_close(g.last_stats[2], torch.ones(1))  # ratio 1: the same step


# -- sparse gradients -----------------------------------------------------------------------------
class SparseModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 3, sparse=True, dtype=torch.float64)
        self.out = nn.Linear(3, 1, dtype=torch.float64)

    def forward(self, idx):
        return self.out(self.emb(idx))


def sparse_run(model, opt, steps=4):
    out = []
    for t in range(steps):
        opt.zero_grad()
        model(torch.tensor([t % 10, (3 * t + 1) % 10])).pow(2).sum().backward()
        opt.step()
        out.append(flat(model))
    return out


def test_sparse_gradients_take_the_generic_path_with_auto():
    ref = SparseModel()
    expected = sparse_run(ref, torch.optim.SGD(ref.parameters(), lr=0.1))
    model = SparseModel()
    g = Graft(torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.5), names=model)
    assert g.path == "direct"  # with dense gradients
    for x, y in zip(sparse_run(model, g), expected):  # D = M up to its lr: M#D is M
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    model2 = SparseModel()
    g2 = Graft(torch.optim.SGD(model2.parameters(), lr=0.1), torch.optim.Adagrad(model2.parameters(), lr=0.1),
               names=model2)
    sparse_run(model2, g2)
    assert torch.isfinite(g2.last_stats).all() and g2.steps == 4


REFUSED = {
    # Adam refuses sparse gradients inside its step, after earlier groups moved: the Graft asks first
    "adam-auto": (lambda m: torch.optim.Adam([{"params": m.out.parameters()}, {"params": m.emb.parameters()}], lr=0.1),
                  "auto", "magnitude optimizer Adam does not take sparse gradients"),
    "adam-generic": (lambda m: torch.optim.Adam([{"params": m.out.parameters()}, {"params": m.emb.parameters()}]),
                     "generic", "magnitude optimizer Adam does not take sparse gradients"),
    "sgd-direct": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "direct", "path='generic' or path='auto'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_sparse_step_changes_nothing(case):
    make_m, path, message = REFUSED[case]
    model = SparseModel()
    g = Graft(make_m(model), torch.optim.SGD(model.parameters(), lr=0.2), names=model, path=path)
    model(torch.tensor([1, 2])).sum().backward()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: (p.grad, p.grad.to_dense().clone()) for n, p in model.named_parameters()}
    with pytest.raises(GraftlabError, match=message):
        g.step()
    assert all(torch.equal(weights[n], p.detach()) for n, p in model.named_parameters())
    for n, p in model.named_parameters():
        assert p.grad is grads[n][0] and torch.equal(p.grad.to_dense(), grads[n][1]), n
    assert g.steps == 0 and torch.isnan(g.last_stats).all()
    for child in (g.magnitude, g.direction):
        assert not any(child.state[p] for p in model.parameters())


def test_sparse_adam_child_refuses_dense_gradients_first():
    model = make("mlp")
    g = Graft(torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SparseAdam(list(model.parameters())))
    loss_fn(model, batches("mlp", 1)[0]).backward()
    before = flat(model)
    with pytest.raises(GraftlabError, match="direction optimizer SparseAdam takes sparse gradients only"):
        g.step()
    assert torch.equal(flat(model), before) and not any(g.magnitude.state.values())


# -- gradients belong to the training loop ----------------------------------------------------------
class CenteredSGD(torch.optim.SGD):
    """Gradient centralisation inside step: edits p.grad in place (a subclass: the generic path)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad.sub_(p.grad.mean())
        return super().step(closure)


@pytest.mark.parametrize("role", ["magnitude", "direction"])
def test_children_see_the_same_gradient_and_leave_p_grad_alone(role):
    p = nn.Parameter(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    gt = torch.tensor([1.0, 3.0, -2.0], dtype=torch.float64)
    editing, plain = CenteredSGD([p], lr=0.1), torch.optim.SGD([p], lr=0.2)
    g = Graft(editing, plain) if role == "magnitude" else Graft(plain, editing)
    p.grad = grad = gt.clone()
    w = p.detach().clone()
    g.step()
    centred = gt - gt.mean()
    d_m, d_d = (-0.1 * centred, -0.2 * gt) if role == "magnitude" else (-0.2 * gt, -0.1 * centred)
    torch.testing.assert_close(p.detach() - w, d_m.norm() / d_d.norm() * d_d, rtol=1e-12, atol=1e-15)
    assert p.grad is grad and torch.equal(p.grad, gt)


@pytest.mark.parametrize("which", ["magnitude", "direction"])
def test_a_child_that_fails_leaves_weights_and_gradients_as_they_were(which):
    class Failing(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)  # moves the weights, then fails
            raise RuntimeError("child failed")

    model = make("mlp")
    fail, ok = Failing(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)
    g = Graft(fail, ok) if which == "magnitude" else Graft(ok, fail)
    loss_fn(model, batches("mlp", 1)[0]).backward()
    before = flat(model)
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    with pytest.raises(RuntimeError, match="child failed"):
        g.step()
    assert torch.equal(flat(model), before) and g.steps == 0
    assert all(p.grad is gr and torch.equal(p.grad, v) for p, (gr, v) in zip(model.parameters(), grads))


# -- names ---------------------------------------------------------------------------------------------
def test_optimizers_built_from_named_parameters_name_the_groups():
    model = make("mlp")
    g = Graft(torch.optim.Adam(model.named_parameters()), torch.optim.SGD(model.named_parameters(), lr=0.1))
    assert g.group_names == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    extra = nn.Parameter(torch.ones(2, dtype=torch.float64))
    g.add_param_group({"params": [("extra.scale", extra)]})
    assert g.group_names[-1] == "extra.scale"
    assert g.magnitude.param_groups[-1]["param_names"] == ["extra.scale"]
    g.add_param_group({"params": [nn.Parameter(torch.ones(1, dtype=torch.float64))]})  # no names given
    assert g.group_names[-1] == "param.5" and g.direction.param_groups[-1]["param_names"] == ["param.5"]


def test_user_mistakes_raise_graftlab_errors_in_api_terms():
    a, b = make("mlp"), make("mlp")
    sgd = lambda m, **k: torch.optim.SGD(m.parameters(), **{"lr": 0.1, **k})  # noqa: E731
    cases = [
        (lambda: Graft(sgd(a), sgd(b)), "same parameters"),
        (lambda: Graft(sgd(a), sgd(a), granularity="rows"), "granularity must be one of .* got 'rows'"),
        (lambda: Graft(sgd(a), sgd(a), granularity=lambda n: 3), "granularity function returned 3"),
        (lambda: Graft(sgd(a), sgd(a), names=b), "names do not match"),
        (lambda: Graft(sgd(a), sgd(a), names=[1, 2]), "names must be an nn.Module"),
        (lambda: Graft(sgd(a), sgd(a), path="fast"), "path must be one of 'auto', 'direct', 'generic', got 'fast'"),
        (lambda: Graft(sgd(a), "sgd"), "direction must be a torch.optim.Optimizer"),
        (lambda: Graft(torch.optim.Adadelta(a.parameters()), sgd(a), path="direct"), "no direct path for Adadelta"),
        (lambda: Graft(sgd(a), sgd(a), names=[("x", p) for p in a.parameters()], granularity="layer"),
         "parameter names must be unique for granularity='layer'"),
    ]
    for make_it, message in cases:
        with pytest.raises(GraftlabError, match=message) as err:
            make_it()
        assert "--" not in str(err.value) and "\n" not in str(err.value)
    g = Graft(sgd(a), sgd(a, lr=0.2), names=a)
    with pytest.raises(GraftlabError, match="not a Graft state dict"):
        g.load_state_dict(g.magnitude.state_dict())
    other = Graft(sgd(a), sgd(a, lr=0.2), granularity="global")
    with pytest.raises(GraftlabError, match="different partition"):
        g.load_state_dict(other.state_dict())
    sd = g.state_dict()
    sd["direction"]["param_groups"][0]["params"] = [0]
    before = copy.deepcopy(g.magnitude.state_dict())
    with pytest.raises(GraftlabError, match=r"state_dict\['direction'\] has parameter groups of sizes \[1\]"):
        g.load_state_dict(sd)
    assert g.magnitude.state_dict() == before


@pytest.mark.parametrize("kwargs,message,param", [
    (dict(granularity=3), "or a function from parameter name to group label, got 3", "granularity"),
    (dict(granularity=None), "granularity must be one of", "granularity"),
    (dict(names="model"), "names must be the model (an nn.Module), its named_parameters() or None, got str", "names"),
    (dict(names=5), "names must be the model", "names"),
    (dict(split="rows"), "split must be one of 'fused', None, got 'rows'", "split"),
    (dict(fused=1), "fused must be True or False, got 1", "fused"),
    (dict(path=None), "path must be one of 'auto', 'direct', 'generic', got None", "path"),
])
def test_wrong_argument_types_are_one_error_each(kwargs, message, param):
    """Each wrong type is refused up front with the parameter it is about, torch.optim style."""
    a = make("mlp")
    with pytest.raises(GraftlabError) as err:
        Graft(torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(a.parameters(), lr=0.1), **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert err.value.params == (param,)


def test_layer_groups_without_names_are_said_at_construction():
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"without names=: 4 parameter tensor\(s\) are named param\.0.*names=model"):
        g = Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1))
    assert g.group_names == ("param.0", "param.1", "param.2", "param.3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named, or global (one group, "global"): nothing to say
        Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1), names=model)
        Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1), granularity="global")
        named = list(model.named_parameters())  # torch's own named param groups name them too
        Graft(torch.optim.Adam(named), torch.optim.SGD(named, lr=0.1))
