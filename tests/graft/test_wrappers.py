"""Models wrapped by torch.compile or DataParallel are named as the plain model: the trace of a
compiled training run gives corrections that apply to the uncompiled model users evaluate."""
import pytest
import torch
from torch import nn

import graftlab
from graftlab import names as wrappers
from graftlab.errors import GraftlabError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


PLAIN = ["0.weight", "0.bias", "2.weight", "2.bias"]


class _Holder(nn.Module):
    """A real submodule called ``module``: its name is the model's own and stays."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(2, 2)
        self.head = torch.compile(nn.Linear(2, 1), backend="eager")  # a compiled submodule


def test_names_drop_wrapper_segments_only_for_wrappers():
    model = _model()
    assert [n for n, _ in model.named_parameters()] != [n for n, _ in torch.compile(model).named_parameters()]
    for wrapped in (torch.compile(model), nn.DataParallel(model), torch.compile(nn.DataParallel(model))):
        assert [n for n, _ in wrappers.named_parameters(wrapped)] == PLAIN
        assert wrappers.unwrap(wrapped) is model
    holder = _Holder()
    assert [n for n, _ in wrappers.named_parameters(holder)] == ["module.weight", "module.bias", "head.weight",
                                                                 "head.bias"]
    assert [n for n, _ in wrappers.named_modules(holder)] == ["", "module", "head"]


def test_trace_of_a_compiled_model_applies_to_the_plain_one(tmp_path):
    model = _model()
    compiled = torch.compile(model, backend="eager")  # dynamo traces the forward; no C++ build on CPU
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    graft = graftlab.Graft(adam, sgd, granularity="layer", names=compiled)
    assert list(graft.group_names) == PLAIN
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    with graftlab.Recorder(graft, tmp_path / "t", model=compiled, flush_seconds=None) as rec:
        for _ in range(4):
            loss = nn.functional.mse_loss(compiled(x), y)
            graft.zero_grad()
            loss.backward()
            graft.step()
            rec.log(loss=loss.detach())
    groups = graftlab.read_trace(tmp_path / "t").attrs["graftlab"]["groups"]
    assert sorted(g["name"] if isinstance(g, dict) else g for g in groups) == sorted(PLAIN)
    corr = graftlab.distill.distill(tmp_path / "t", window=4)

    fresh = _model()
    applied = graftlab.apply_corrections(corr, fresh.named_parameters(), 0.1)
    assert [g["name"] for g in applied.param_groups] == PLAIN
    # the compiled model's own pairs, the compiled model itself and DataParallel's pairs all match too
    for named in (torch.compile(fresh).named_parameters(), torch.compile(fresh),
                  nn.DataParallel(fresh).named_parameters(), nn.DataParallel(fresh)):
        again = graftlab.apply_corrections(corr, named, 0.1)
        assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in applied.param_groups]
    with pytest.raises(GraftlabError, match="match no parameter"):
        graftlab.apply_corrections(corr, [("other." + n, p) for n, p in fresh.named_parameters()], 0.1)
