"""A Graft follows parameters changed after it was built (cast, moved, swapped by accelerate or
FSDP2), reaches its children's train()/eval(), and refuses children that need a closure."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graftlab
from graftlab.errors import GraftlabError
from graftlab.graft import fused as fused_mod

torch.set_num_threads(1)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def batches(n=5, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g).to(dtype=dtype, device=device),
             torch.randn(16, 2, generator=g).to(dtype=dtype, device=device)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


PATHS = [dict(path="direct"), dict(path="generic"), dict(path="direct", fused=True)]


@pytest.fixture(autouse=True)
def _eager_fused(monkeypatch):
    monkeypatch.setattr(fused_mod, "COMPILE", False)  # the fused math, without minutes of compiling


@pytest.mark.parametrize("kw", PATHS, ids=["direct", "generic", "fused"])
def test_double_after_build_adam_graft_adam_is_adam_in_float64(kw):
    model, ref = mlp(), mlp()
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(model.parameters(), lr=1e-2),
                           names=model, **kw)
    model.double()  # the same Parameter objects, new float64 data
    ref.double()
    plain = torch.optim.Adam(ref.parameters(), lr=1e-2)
    data = batches()
    train(model, graft, data)
    train(ref, plain, data)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert graft.last_stats.dtype == torch.float64
    if graft._buf is not None:
        assert all(b.dtype == torch.float64 for b in graft._buf)
    ratio = graft.last_stats[2]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-12, atol=0)


def test_fabric_64_true_casts_after_build_and_the_graft_follows():
    lightning = pytest.importorskip("lightning")
    fabric = lightning.Fabric(accelerator="cpu", devices=1, precision="64-true")
    model, ref = mlp(), mlp()
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(model.parameters(), lr=0.1),
                           names=model)
    model, opt = fabric.setup(model, graft)
    assert next(model.parameters()).dtype == torch.float64
    # reference: the same Graft built on a model Fabric cast before construction
    ref = fabric.setup_module(ref)
    ref_graft = graftlab.Graft(torch.optim.Adam(ref.parameters(), lr=1e-2), torch.optim.SGD(ref.parameters(), lr=0.1),
                               names=ref.module)
    ref_opt = fabric.setup_optimizers(ref_graft)
    for m, o in ((model, opt), (ref, ref_opt)):
        for x, y in batches():
            o.zero_grad()
            fabric.backward(nn.functional.mse_loss(m(x), y))  # Fabric hands the output back as float32
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert graft.group_names == ref_graft.group_names


def swapped(model):
    """New Parameter objects with the same values, as a training stack swaps them in."""
    twin = copy.deepcopy(model)
    return twin, {p: q for p, q in zip(model.parameters(), twin.parameters())}


@pytest.mark.parametrize("kw", PATHS, ids=["direct", "generic", "fused"])
def test_accelerate_switch_parameters_is_carried_into_d(kw):
    accelerate = pytest.importorskip("accelerate")
    model, ref = mlp(), mlp()
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(model.parameters(), lr=0.1),
                           names=model, **kw)
    names = graft.group_names
    accelerate.Accelerator(cpu=True)
    wrapped = accelerate.optimizer.AcceleratedOptimizer(graft, device_placement=False)
    twin, mapping = swapped(model)
    wrapped._switch_parameters(mapping)  # accelerate's own swap: the Graft's (M's) param_groups only
    ref_graft = graftlab.Graft(torch.optim.Adam(ref.parameters(), lr=1e-2), torch.optim.SGD(ref.parameters(), lr=0.1),
                               names=ref, **kw)
    data = batches(dtype=torch.float32)
    train(twin, graft, data)
    train(ref, ref_graft, data)
    held = {id(p) for g in graft.direction.param_groups for p in g["params"]}
    assert held == {id(p) for p in twin.parameters()}
    assert graft.group_names == names
    for p, q, old in zip(twin.parameters(), ref.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert not torch.equal(p, old)  # the new tensors stepped, the old ones did not
    torch.testing.assert_close(graft.last_stats, ref_graft.last_stats, rtol=0, atol=0)


def test_fsdp2_switch_optimizer_parameters_is_carried_into_d():
    pytest.importorskip("accelerate")
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    model, ref = mlp(), mlp()
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(model.parameters(), lr=0.1),
                           names=model)
    twin, mapping = swapped(model)
    # accelerate's prepare: placeholders keyed by the original parameter, then the switch
    keyed = {}
    for group in graft.param_groups:
        for i, p in enumerate(group["params"]):
            placeholder = torch.empty(1, dtype=p.dtype)
            placeholder.data_ptr = id(p)
            keyed[id(p)] = mapping[p]
            group["params"][i] = placeholder
    fsdp2_switch_optimizer_parameters(graft, keyed)
    ref_graft = graftlab.Graft(torch.optim.Adam(ref.parameters(), lr=1e-2), torch.optim.SGD(ref.parameters(), lr=0.1),
                               names=ref)
    data = batches(dtype=torch.float32)
    train(twin, graft, data)
    train(ref, ref_graft, data)
    for p, q in zip(twin.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_swap_d_does_not_hold_either_way_is_one_error_and_changes_nothing():
    model = mlp()
    graft = graftlab.Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1),
                           names=model)
    before = [list(g["params"]) for g in graft.direction.param_groups]
    other, _ = swapped(model)
    graft.param_groups[0]["params"] = list(other.parameters())[:2]  # fewer tensors: no position to follow
    model(torch.ones(2, 4)).sum().backward()
    with pytest.raises(GraftlabError, match="same parameters"):
        graft.step()
    assert [list(g["params"]) for g in graft.direction.param_groups] == before
    assert not graft.magnitude.state


def test_state_left_in_another_dtype_is_one_error_before_anything_moves():
    model = mlp()
    graft = graftlab.Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1),
                           names=model)
    train(model, graft, batches(1, dtype=torch.float32))
    model.double()
    weights = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    with pytest.raises(GraftlabError, match=r"0\.weight is now torch.float64 .* 'exp_avg' as torch.float32"):
        graft.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert graft.steps == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kw", PATHS[:2], ids=["direct", "generic"])
def test_moved_to_cuda_after_build_steps_as_adam_there(kw):
    model, ref = mlp(), mlp()
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(model.parameters(), lr=1e-2),
                           names=model, **kw)
    model.cuda()
    ref.cuda()
    plain = torch.optim.Adam(ref.parameters(), lr=1e-2)
    data = batches(dtype=torch.float32, device="cuda")
    train(model, graft, data)
    train(ref, plain, data)
    assert graft.last_stats.device.type == "cuda"
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.LBFGS(ps),
    lambda ps: pytest.importorskip("pytorch_optimizer").SAM(ps, torch.optim.SGD, lr=0.1),
], ids=["LBFGS", "SAM"])
def test_children_that_need_a_closure_are_refused_at_construction(make):
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(GraftlabError, match="needs a closure"):
        graftlab.Graft(sgd, make(model.parameters()), names=model)
    with pytest.raises(GraftlabError, match="magnitude optimizer .* needs a closure"):
        graftlab.Graft(make(model.parameters()), sgd, names=model)
    assert not sgd.state


def test_step_with_a_closure_evaluates_it_once_and_steps_on_its_gradients():
    model, ref = mlp(), mlp()
    graft = graftlab.Graft(torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1),
                           names=model)
    plain = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = batches(1, dtype=torch.float32)[0]
    calls = []

    def closure(m, opt):
        def run():
            calls.append(1)
            opt.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        return run

    loss = graft.step(closure(model, graft))
    plain.step(closure(ref, plain))
    assert len(calls) == 2 and loss.ndim == 0
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_train_and_eval_reach_schedule_free_children():
    schedulefree = pytest.importorskip("schedulefree")
    model, ref = mlp(), mlp()
    sf = schedulefree.SGDScheduleFree(model.parameters(), lr=0.1)
    graft = graftlab.Graft(schedulefree.SGDScheduleFree(model.parameters(), lr=0.1), sf, names=model)
    plain = schedulefree.SGDScheduleFree(ref.parameters(), lr=0.1)
    graft.train()
    plain.train()
    assert sf.param_groups[0]["train_mode"] and graft.magnitude.param_groups[0]["train_mode"]
    data = batches(3, dtype=torch.float32)
    train(model, graft, data)  # A#A behaves as A
    train(ref, plain, data)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    graft.eval()
    assert not sf.param_groups[0]["train_mode"]
    graft.train()
    assert sf.param_groups[0]["train_mode"]
    # children without train/eval are left alone
    plain_graft = graftlab.Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1))
    plain_graft.train()
    plain_graft.eval()


def test_add_param_group_with_unnamed_tensors_names_them_by_position():
    head, body = nn.Linear(4, 1), nn.Linear(4, 4)
    graft = graftlab.Graft(torch.optim.SGD(head.parameters(), lr=0.1), torch.optim.SGD(head.parameters(), lr=0.1),
                           names=list(head.named_parameters()))
    graft.add_param_group({"params": list(body.parameters())})
    assert graft.group_names == ("weight", "bias", "param.2", "param.3")
    head(body(torch.ones(2, 4))).sum().backward()
    graft.step()
    # names from a module still have to name every tensor
    module_named = graftlab.Graft(torch.optim.SGD(head.parameters(), lr=0.1),
                                  torch.optim.SGD(head.parameters(), lr=0.1), names=head)
    with pytest.raises(GraftlabError, match="no name"):
        module_named.add_param_group({"params": list(nn.Linear(2, 2).parameters())})


def test_fused_layout_follows_data_replaced_in_place_of_the_same_parameter():
    model, ref = mlp(), mlp()
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(model.parameters(), lr=0.1),
                           names=model, fused=True)
    ref_graft = graftlab.Graft(torch.optim.Adam(ref.parameters(), lr=1e-2), torch.optim.SGD(ref.parameters(), lr=0.1),
                               names=ref, fused=True)
    data = batches(4, dtype=torch.float32)
    train(model, graft, data[:2])
    train(ref, ref_graft, data[:2])
    for p in model.parameters():
        p.data = p.data.clone()  # same Parameter, new storage: the fused views of the old one are stale
    train(model, graft, data[2:])
    train(ref, ref_graft, data[2:])
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
