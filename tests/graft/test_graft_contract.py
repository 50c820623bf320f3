"""Graft keeps every promise of torch.optim.Optimizer, tested as torch tests its optimizers: a table of
optimizer pairs x paths x granularities through schedulers, hooks, state-dict round trips,
deepcopy/pickle and add_param_group (compile, complex, sparse and gradient ownership are in
tests/graft/test_graft_inputs.py)."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from graftlab import Graft, GraftlabError
from tests.models import batches, loss_fn, make
from tests.graft.test_graft import flat, trajectory

torch.set_num_threads(1)

# name -> (M factory, D factory); "generic" pairs have no direct rule for one child
PAIRS = {
    "adam#sgd": (lambda p: torch.optim.Adam(p, lr=1e-2), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "sgd#adagrad": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5), lambda p: torch.optim.Adagrad(p, lr=0.1)),
    "adamw#rmsprop": (
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    ),
    "adadelta#sgd": (lambda p: torch.optim.Adadelta(p, lr=1.0), lambda p: torch.optim.SGD(p, lr=0.1)),
}
CASES = [(pair, path) for pair in PAIRS for path in ("direct", "generic")
         if not (pair == "adadelta#sgd" and path == "direct")]
GRANULARITIES = ("layer", "global", "coordinate")


def graft(model: nn.Module, pair: str, path: str, granularity="layer") -> Graft:
    make_m, make_d = PAIRS[pair]
    return Graft(make_m(model.parameters()), make_d(model.parameters()), granularity=granularity, names=model,
                 path=path)


def run(model, opt, data, sched=None, lrs=None) -> list[torch.Tensor]:
    """The weights after each step; ``lrs`` collects the lr the optimizer reads after each step."""
    out = []
    for batch in data:
        out += trajectory(model, opt, [batch], sched)
        if lrs is not None:
            lrs.append(opt.param_groups[0]["lr"])
    return out


def assert_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for t, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"step {t}: max diff {(x - y).abs().max()}"


SCHEDULERS = {
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + 0.5 * t)),
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.02, total_steps=8, cycle_momentum="betas" in o.defaults or "momentum" in o.defaults
    ),
}


# -- param_groups are M's ---------------------------------------------------------------------------
@pytest.mark.parametrize("sched", SCHEDULERS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("pair,path", CASES)
def test_scheduler_on_graft_drives_m_exactly_as_on_m(pair, path, granularity, sched):
    data = batches("mlp", 6)
    a, b = make("mlp"), make("mlp")
    ga, gb = graft(a, pair, path, granularity), graft(b, pair, path, granularity)
    lrs_a, lrs_b = [], []
    on_graft = run(a, ga, data, SCHEDULERS[sched](ga), lrs_a)
    on_m = run(b, gb, data, SCHEDULERS[sched](gb.magnitude), lrs_b)
    assert_identical(on_graft, on_m)
    assert lrs_a == lrs_b
    assert ga.param_groups[0]["lr"] == ga.magnitude.param_groups[0]["lr"] == lrs_a[-1]
    assert len(set(lrs_a)) > 1  # the schedule moved the lr


@pytest.mark.parametrize("path", ["direct", "generic"])
def test_scheduler_on_a_graft_of_a_with_itself_gives_a_with_that_schedule(path):
    """Schedule invariance through the Graft's own param_groups: A#A' with LambdaLR(graft) is A with LambdaLR(A)."""
    data = batches("block", 6)
    ref = make("block")
    adam = torch.optim.Adam(ref.parameters(), lr=1e-2)
    expected = run(ref, adam, data, torch.optim.lr_scheduler.LambdaLR(adam, lambda t: 0.7**t))
    model = make("block")
    g = Graft(torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(model.parameters(), lr=3.0),
              names=model, path=path)
    got = run(model, g, data, torch.optim.lr_scheduler.LambdaLR(g, lambda t: 0.7**t))
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_param_groups_and_defaults_are_the_magnitude_optimizers():
    model = make("mlp")
    g = graft(model, "adam#sgd", "direct")
    m = g.magnitude
    assert g.param_groups is m.param_groups and g.defaults is m.defaults
    g.param_groups[0]["lr"] = 0.123
    assert m.param_groups[0]["lr"] == 0.123
    m.load_state_dict(m.state_dict())  # torch replaces the list: the Graft follows
    assert g.param_groups is m.param_groups and g.param_groups[0]["lr"] == 0.123
    loss_fn(model, batches("mlp", 1)[0]).backward()
    g.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_hf_linear_warmup_schedule_on_graft():
    transformers = pytest.importorskip("transformers")
    data = batches("mlp", 6)
    a, b = make("mlp"), make("mlp")
    ga, gb = graft(a, "adam#sgd", "direct"), graft(b, "adam#sgd", "direct")
    sa = transformers.get_linear_schedule_with_warmup(ga, num_warmup_steps=2, num_training_steps=6)
    sb = transformers.get_linear_schedule_with_warmup(gb.magnitude, num_warmup_steps=2, num_training_steps=6)
    assert_identical(run(a, ga, data, sa), run(b, gb, data, sb))


# -- hooks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair,path", CASES)
def test_step_hooks_fire_on_graft_and_children_on_both_paths(pair, path):
    model = make("mlp")
    g = graft(model, pair, path)
    calls = []
    for who, opt in (("graft", g), ("M", g.magnitude), ("D", g.direction)):
        opt.register_step_pre_hook(lambda o, a, k, who=who: calls.append((who, "pre", o)))
        opt.register_step_post_hook(lambda o, a, k, who=who: calls.append((who, "post", o)))
    global_calls = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: global_calls.append(o)),
               register_optimizer_step_post_hook(lambda o, a, k: global_calls.append(o))]
    try:
        run(model, g, batches("mlp", 2))
    finally:
        for h in handles:
            h.remove()
    one = [("graft", "pre"), ("M", "pre"), ("M", "post"), ("D", "pre"), ("D", "post"), ("graft", "post")]
    assert [(w, k) for w, k, _ in calls] == one * 2
    who = {"graft": g, "M": g.magnitude, "D": g.direction}
    assert all(o is who[w] for w, _, o in calls)
    order = (g, g.magnitude, g.magnitude, g.direction, g.direction, g)
    assert [id(o) for o in global_calls] == [id(o) for o in order] * 2


@pytest.mark.parametrize("pair,path", CASES)
def test_state_dict_and_load_hooks_fire(pair, path):
    model = make("mlp")
    g = graft(model, pair, path)
    run(model, g, batches("mlp", 2))
    seen = []
    g.register_state_dict_pre_hook(lambda o: seen.append("sd pre"))
    g.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    sd = g.state_dict()
    assert sd["extra"] == 1 and seen == ["sd pre"]

    def rename_back(o, sd):
        seen.append("load pre")
        sd = dict(sd)
        sd["graft"] = sd.pop("renamed")
        return sd

    g.register_load_state_dict_pre_hook(rename_back)
    g.register_load_state_dict_post_hook(lambda o: seen.append(("load post", o.steps)))
    sd["renamed"] = sd.pop("graft")
    g.load_state_dict(sd)
    assert seen == ["sd pre", "load pre", ("load post", 2)]


# -- state-dict round trips, deepcopy, pickle ----------------------------------------------------------
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("pair,path", CASES)
def test_state_dict_round_trip_through_torch_save_resumes_identically(pair, path, granularity):
    data = batches("block", 7)
    model = make("block")
    g = graft(model, pair, path, granularity)
    sched = SCHEDULERS["lambda"](g)
    run(model, g, data[:3], sched)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": g.state_dict(), "sched": sched.state_dict()}, buf)
    expected = run(model, g, data[3:], sched)

    resumed = make("block", seed=7)
    g2 = graft(resumed, pair, path, granularity)
    s2 = SCHEDULERS["lambda"](g2)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # torch's default: plain containers and tensors only
    resumed.load_state_dict(ckpt["model"])
    g2.load_state_dict(ckpt["opt"])
    s2.load_state_dict(ckpt["sched"])
    assert g2.steps == 3 and g2.param_groups[0]["lr"] == s2.get_last_lr()[0] != s2.base_lrs[0]
    assert_identical(run(resumed, g2, data[3:], s2), expected)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("granularity", ["layer", "coordinate", "custom"])
@pytest.mark.parametrize("pair,path", CASES)
def test_copies_are_working_grafts(pair, path, granularity, how):
    data = batches("block", 6)
    model = make("block")
    gran = (lambda n: n.split(".")[0]) if granularity == "custom" else granularity  # noqa: E731
    g = graft(model, pair, path, gran)
    calls = []
    g.register_step_post_hook(lambda *a: calls.append(1))
    run(model, g, data[:2])
    if how == "deepcopy":
        model2, g2 = copy.deepcopy((model, g))
    else:
        model2, g2 = pickle.loads(pickle.dumps((model, g)))
    assert g2.group_names == g.group_names and g2.steps == 2 and g2.path == g.path
    assert set(map(id, g2.params)) == set(map(id, model2.parameters()))
    torch.testing.assert_close(g2.last_stats, g.last_stats, rtol=0, atol=0, equal_nan=True)
    expected = run(model, g, data[2:])
    assert_identical(run(model2, g2, data[2:]), expected)
    assert len(calls) == 6  # hooks are not copied (as for torch.optim optimizers)
    assert g2.state_dict()["graft"] == g.state_dict()["graft"]


def test_pickled_lambda_partition_labels_known_tensors_and_refuses_new_ones():
    model = make("mlp")
    g = Graft(torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.2),
              granularity=lambda n: n[:3], names=model)
    model2, g2 = pickle.loads(pickle.dumps((model, g)))
    assert g2.group_names == ("fc1", "fc2")
    extra = nn.Parameter(torch.ones(2, dtype=torch.float64))
    with pytest.raises(GraftlabError, match="unpickled without its granularity function"):
        g2.add_param_group({"params": [("new.weight", extra)]})
    assert len(g2.magnitude.param_groups) == len(g2.direction.param_groups) == 1  # nothing changed


# -- add_param_group ------------------------------------------------------------------------------------
OPTIMIZERS = {
    "sgd": lambda p, **k: torch.optim.SGD(p, **{"lr": 0.05, "momentum": 0.9, "nesterov": True, **k}),
    "adam": lambda p, **k: torch.optim.Adam(p, **{"lr": 1e-2, "weight_decay": 1e-3, **k}),
    "adagrad": lambda p, **k: torch.optim.Adagrad(p, **{"lr": 0.05, "weight_decay": 1e-3, **k}),
    "rmsprop": lambda p, **k: torch.optim.RMSprop(p, **{"lr": 1e-2, "centered": True, "momentum": 0.5, **k}),
}


def _unfreeze_run(model, opt, data, add):
    """Train the head, then add the body (progressive unfreezing) and train both."""
    out = run(model, opt, data[:2])
    add(opt)
    return out + run(model, opt, data[2:])


@pytest.mark.parametrize("granularity", ["layer", "global", "coordinate"])
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("path", ["direct", "generic"])
def test_add_param_group_grafts_the_new_group(path, name, granularity):
    """A#A stays A when a group is added later: the new tensors are grafted, not stepped twice."""
    data = batches("mlp", 5)
    body = lambda m: list(m.fc1.parameters())  # noqa: E731
    head = lambda m: list(m.fc2.parameters())  # noqa: E731
    ref = make("mlp")
    expected = _unfreeze_run(ref, OPTIMIZERS[name](head(ref)), data, lambda o: o.add_param_group({"params": body(ref)}))
    model = make("mlp")
    g = Graft(OPTIMIZERS[name](head(model)), OPTIMIZERS[name](head(model), lr=0.77), granularity=granularity,
              names=model, path=path)
    got = _unfreeze_run(model, g, data, lambda o: o.add_param_group({"params": body(model)}))
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)
    assert g.path == path
    if granularity != "global":
        assert g.group_names == ("fc2.weight", "fc2.bias", "fc1.weight", "fc1.bias")
        assert g.last_stats.shape == (3, 4) and torch.isfinite(g.last_stats).all()


@pytest.mark.parametrize("path", ["direct", "generic"])
def test_groups_added_to_both_children_directly_are_grafted(path):
    """The shared case: SGD#SGD (D = M up to its lr) steps as M on a group the user added to both."""
    torch.manual_seed(0)
    head, body = nn.Linear(4, 1), nn.Linear(4, 4)
    m, d = torch.optim.SGD(head.parameters(), lr=0.1), torch.optim.SGD(head.parameters(), lr=0.01)
    g = Graft(m, d, path=path)
    m.add_param_group({"params": list(body.parameters())})
    d.add_param_group({"params": list(body.parameters())})
    head(body(torch.ones(2, 4))).sum().backward()
    w, grad = body.weight.detach().clone(), body.weight.grad.clone()
    g.step()
    torch.testing.assert_close(body.weight.detach() - w, -0.1 * grad, rtol=1e-5, atol=1e-7)
    assert g.group_names == ("param.0", "param.1", "param.2", "param.3")


def test_add_param_group_options_names_and_refusals():
    model = make("mlp")
    frozen = list(model.fc1.parameters())
    g = Graft(torch.optim.Adam(model.fc2.parameters(), lr=1e-2), torch.optim.SGD(model.fc2.parameters(), lr=0.1),
              names=model)  # names may name tensors the optimizers do not hold yet
    g.add_param_group({"params": frozen, "lr": 1e-3}, direction={"momentum": 0.9})
    mg, dg = g.magnitude.param_groups[-1], g.direction.param_groups[-1]
    assert mg["lr"] == 1e-3 and mg["betas"] == (0.9, 0.999)  # M's options and defaults
    assert dg["lr"] == 0.1 and dg["momentum"] == 0.9  # D's defaults and its own options
    assert g.group_names[-2:] == ("fc1.weight", "fc1.bias")
    with pytest.raises(GraftlabError, match="already hold"):
        g.add_param_group({"params": frozen})
    with pytest.raises(GraftlabError, match="'params'"):
        g.add_param_group({"lr": 1.0})
    unnamed = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(GraftlabError, match="no name"):
        g.add_param_group({"params": [unnamed]})
    assert len(g.magnitude.param_groups) == len(g.direction.param_groups) == 2  # refusals change nothing
    g.add_param_group({"params": [("extra.scale", unnamed)]})
    assert g.group_names[-1] == "extra.scale"


@pytest.mark.parametrize("path", ["direct", "generic"])
def test_group_added_to_one_child_only_is_refused_before_anything_moves(path):
    model = make("mlp")
    g = graft(model, "adam#sgd", path)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    g.magnitude.add_param_group({"params": [extra]})
    loss_fn(model, batches("mlp", 1)[0]).backward()
    extra.grad = torch.ones(3, dtype=torch.float64)
    before = flat(model)
    with pytest.raises(GraftlabError, match="1 tensor\\(s\\) only in magnitude"):
        g.step()
    assert torch.equal(flat(model), before) and g.steps == 0
    assert not any(g.magnitude.state.values()) and not any(g.direction.state.values())


def test_graft_docstring_example_runs_as_written():
    import doctest

    import graftlab.graft.optimizer

    finder = doctest.DocTestFinder()
    found = finder.find(graftlab.graft.optimizer.Graft, "Graft", globs={"torch": torch, "Graft": Graft})
    tests = [t for t in found if t.examples]
    assert tests
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
