"""Optimizer registry, hyperparameter parsing and JSON descriptions."""
import json

import pytest
import torch

from graftlab import Graft
from graftlab.errors import GraftlabError
from graftlab.graft.optimizers import OPTIMIZERS, describe, hparam_names, make_optimizer, parse_hparams


def params():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_builds_and_steps(name):
    model = params()
    opt = make_optimizer(name, model.parameters(), lr=0.01)
    assert isinstance(opt, OPTIMIZERS[name])
    model(torch.ones(1, 3)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight)
    json.dumps(describe(opt))


def test_hyperparameters_reach_the_optimizer():
    opt = make_optimizer("adam", params().parameters(), 1e-3, **parse_hparams(["betas=0.9,0.98", "eps=1e-6"]))
    d = describe(opt)
    assert d["class"] == "torch.optim.adam.Adam"
    assert d["hyperparameters"]["betas"] == [0.9, 0.98]
    assert d["hyperparameters"]["eps"] == 1e-6
    assert d["hyperparameters"]["lr"] == 1e-3


def test_param_groups_with_names_and_lrs():
    model = params()
    groups = [{"params": [p], "lr": 0.1 * (i + 1), "name": n} for i, (n, p) in enumerate(model.named_parameters())]
    opt = make_optimizer("sgd", groups, 0.1, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    assert [g["name"] for g in opt.param_groups] == ["weight", "bias"]
    d = describe(opt)
    assert (d["lr_min"], d["lr_max"]) == (0.1, 0.2)


def test_parse_hparams_types():
    hp = parse_hparams(["momentum=0.9", "nesterov=true", "betas=0.9, 0.999", "lr_decay=0", "foreach=none"])
    assert hp == {"momentum": 0.9, "nesterov": True, "betas": (0.9, 0.999), "lr_decay": 0, "foreach": None}
    assert parse_hparams(None) == {}


@pytest.mark.parametrize("item", ["momentum", "=0.9", "momentum=", "momentum=fast"])
def test_parse_hparams_rejects(item):
    with pytest.raises(GraftlabError):
        parse_hparams([item])


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(GraftlabError, match="choose one of sgd, adam"):
        make_optimizer("lamb", params().parameters(), 0.1)
    with pytest.raises(GraftlabError, match="valid ones are momentum, dampening"):
        make_optimizer("sgd", params().parameters(), 0.1, betas=(0.9, 0.9))
    with pytest.raises(GraftlabError):
        make_optimizer("sgd", params().parameters(), 0.1, momentum=-1.0)
    with pytest.raises(GraftlabError):
        make_optimizer("sgd", params().parameters(), float("nan"))
    assert "momentum" in hparam_names("sgd") and "lr" not in hparam_names("sgd")


def test_describe_graft_holds_both_children():
    model = params()
    graft = Graft(make_optimizer("adam", model.parameters(), 1e-3), make_optimizer("sgd", model.parameters(), 0.1),
                  names=model)
    d = describe(graft)
    assert d["magnitude"]["class"].endswith("Adam") and d["direction"]["class"].endswith("SGD")
    json.dumps(d)
