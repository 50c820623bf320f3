"""One recipe for a user's own loop (``applied.scheduler(opt)``) and the errors that explain a name mismatch."""
import warnings

import pytest
import torch
from torch import nn

import graftlab
from graftlab.corrections import Corrections, apply
from graftlab.errors import GraftlabError

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def files():
    static = Corrections(multipliers=dict(zip(NAMES, [500.0, 10.0, 0.1, 1.0])), source={"direction_lr": 0.1})
    glob = Corrections(schedule={"global": [[0, 0.5], [3, 2.0]]}, source={"direction_lr": 0.1})
    per_layer = Corrections(schedule={n: [[0, 1.0], [2, f]] for n, f in zip(NAMES, [3.0, 0.5, 7.0, 1.0])},
                            source={"direction_lr": 0.1})
    return {"static": static, "global": glob, "per_layer": per_layer}


@pytest.mark.parametrize("kind", ["static", "global", "per_layer"])
def test_the_same_three_lines_apply_every_kind_of_file(kind):
    m = model()
    corr = files()[kind]
    applied = graftlab.apply_corrections(corr, m, base_lr=0.1)
    opt = torch.optim.SGD(applied.param_groups, lr=0.1)
    scheduler = applied.scheduler(opt)
    for step in range(5):
        # the lr each update uses is base lr x the file's factor at that step, for every tensor
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * f for f in applied.factor_at(step)])
        m(torch.ones(2, 3)).sum().backward()
        opt.step(); opt.zero_grad(); scheduler.step()
    if kind == "per_layer":  # the case LambdaLR(opt, applied.lr_factor) cannot express (lr_factor is None)
        assert applied.lr_factor is None
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.05, 0.7, 0.1])


def test_run_schedule_multiplies_the_files():
    applied = apply(files()["global"], model(), 0.1)
    opt = torch.optim.SGD(applied.param_groups, lr=0.1)
    applied.scheduler(opt, lambda t: 0.25)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * 0.5 * 0.25] * 4)


def test_scheduler_refuses_an_optimizer_over_other_groups():
    m = model()
    applied = apply(files()["static"], m, 0.1)
    with pytest.raises(GraftlabError, match="1 param group.*not the 4 of applied.param_groups"):
        applied.scheduler(torch.optim.SGD(m.parameters(), lr=0.1))


def test_a_wrapper_prefix_is_named_with_its_fix():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model()

    wrapped = Wrapper()
    with pytest.raises(GraftlabError, match=r"model's names start with 'net\.'.*model\.net") as err:
        apply(files()["static"], wrapped, 0.1)
    assert "another model" not in str(err.value)
    # the fix the message offers works
    fixed = [(n.removeprefix("net."), p) for n, p in wrapped.named_parameters()]
    assert [g["factor"] for g in apply(files()["static"], fixed, 0.1).param_groups] == [500.0, 10.0, 0.1, 1.0]
    # and the other way round: a file recorded on the wrapper, a bare model
    outer = Corrections(multipliers={"net." + n: 2.0 for n in NAMES}, source={"direction_lr": 0.1})
    with pytest.raises(GraftlabError, match=r"file's names start with 'net\.'"):
        apply(outer, model(), 0.1)


def test_a_trace_recorded_without_names_is_explained():
    unnamed = Corrections(multipliers={f"param.{i}": 2.0 for i in range(4)}, source={"direction_lr": 0.1})
    with pytest.raises(GraftlabError, match=r"without names=.*names=model"):
        apply(unnamed, model(), 0.1)


def test_allow_missing_that_matches_nothing_is_refused_and_partial_matches_warn_with_counts():
    unnamed = Corrections(multipliers={f"param.{i}": 2.0 for i in range(4)}, source={"direction_lr": 0.1})
    with pytest.raises(GraftlabError, match=r"4 of 4 group\(s\).*without names=.*nothing in the file applies"):
        apply(unnamed, model(), 0.1, allow_missing=True)
    other = Corrections(multipliers={"encoder.q.weight": 2.0}, source={"direction_lr": 0.1})
    with pytest.raises(GraftlabError, match=r"another model\?.*encoder.q.weight; nothing in the file applies"):
        apply(other, model(), 0.1, allow_missing=True)
    names = [n for n, _ in model().named_parameters()]
    partial = Corrections(multipliers={names[0]: 2.0, "encoder.q.weight": 3.0}, source={"direction_lr": 0.1})
    with pytest.warns(UserWarning, match=f"{len(names) - 1} of {len(names)} parameter tensors.*1 of 2 file group"):
        applied = apply(partial, model(), 0.1, allow_missing=True)
    assert [g["factor"] for g in applied.param_groups] == [2.0] + [1.0] * (len(names) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file that matches whole says nothing
        apply(files()["static"], model(), 0.1)


def test_print_of_corrections_is_a_summary_not_a_screenful():
    many = Corrections(multipliers={f"layer.{i}.weight": float(i + 1) for i in range(200)},
                       source={"direction_lr": 0.1, "trace": "runs/t", "round": "none"})
    text = repr(many)
    lines = text.splitlines()
    assert lines[0] == "Corrections(200 static multiplier(s) from runs/t, round none, relative to D's lr 0.1)"
    assert lines[1].split() == ["layer.0.weight", "x", "1"] and len(lines) == 10
    assert "192 more" in lines[-1] and "summary()" in lines[-1]
    sched = files()["per_layer"]
    assert "schedule 1 .. 3 (2 pieces)" in str(sched).splitlines()[1]


def test_distill_stores_the_trace_path_as_given(tmp_path, monkeypatch):
    from graftlab.distill.pipeline import distill

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    corr = distill("sample_traces/bert-adam-sgd-bs16", window=50, round="none")
    assert corr.source["trace"] == "sample_traces/bert-adam-sgd-bs16"


def test_apply_takes_the_path_of_a_corrections_file_and_refuses_other_objects(tmp_path):
    import pytest
    import torch

    import graftlab
    from graftlab.corrections import Corrections, save
    from graftlab.errors import GraftlabError

    model = torch.nn.Linear(3, 2)
    corr = Corrections(multipliers={"weight": 10.0, "bias": 0.1}, source={"direction_lr": 0.1})
    save(corr, tmp_path / "c.json")
    for given in (tmp_path / "c.json", str(tmp_path / "c.json")):
        applied = graftlab.apply_corrections(given, model, 0.1)
        assert sorted(g["lr"] for g in applied.param_groups) == pytest.approx([0.01, 1.0])
    with pytest.raises(GraftlabError, match="must be a Corrections or the path"):
        graftlab.apply_corrections({"weight": 10.0}, model, 0.1)
