"""The corrections file contract: save/load round trip, validation, and apply() to a model."""
import json
import math

import pytest
import torch
from torch import nn

from graftlab.corrections import FORMAT, Corrections, apply, load_corrections, save
from graftlab.errors import GraftlabError


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def corr(**kw):
    mult = {"0.weight": 500.0, "0.bias": 10.0, "2.weight": 0.1, "2.bias": 1.0}
    src = {"direction_lr": 0.1, "groups": {n: {"kind": "ffn"} for n in NAMES}}
    return Corrections(multipliers=kw.get("multipliers", mult), schedule=kw.get("schedule", {}), source=src)


def test_json_round_trip_and_no_overwrite(tmp_path):
    c = corr(schedule={"global": [[0, 0.5], [10, 2.0]]})
    p = save(c, tmp_path / "c.json")
    data = json.loads(p.read_text())
    assert data["format"] == FORMAT
    back = load_corrections(p)
    assert back.multipliers == c.multipliers and back.schedule == c.schedule and back.direction_lr == 0.1
    before = p.read_text()
    with pytest.raises(GraftlabError, match="already exists; pass overwrite=True"):
        save(corr(multipliers={"0.weight": 1.0}), p)
    assert p.read_text() == before
    save(corr(multipliers={"0.weight": 2.0}), p, overwrite=True)
    assert load_corrections(p).multipliers == {"0.weight": 2.0}
    assert [f.name for f in tmp_path.iterdir()] == ["c.json"]  # no temporary files left


def test_csv_export(tmp_path):
    p = save(corr(), tmp_path / "c.csv", format="csv")
    lines = p.read_text().splitlines()
    assert lines[0] == "group,kind,factor"
    assert lines[1] == "0.weight,ffn,500.0"
    with pytest.raises(GraftlabError, match="CSV export"):
        load_corrections(p)
    p2 = save(corr(schedule={"global": [[0, 0.5], [10, 2.0]]}), tmp_path / "s.csv", format="csv")
    assert p2.read_text().splitlines()[0] == "group,kind,start,factor"
    assert "global,other,10,2.0" in p2.read_text()


@pytest.mark.parametrize("payload,msg", [
    ({"format": FORMAT, "multipliers": {"a": float("nan")}}, "finite and positive"),
    ({"format": FORMAT, "multipliers": {"a": -1.0}}, "finite and positive"),
    ({"format": FORMAT, "multipliers": {"a": 0}}, "finite and positive"),
    ({"format": FORMAT, "multipliers": {"a": "3"}}, "not a number"),
    ({"format": FORMAT, "multipliers": {"a": float("inf")}}, "finite and positive"),
    ({"format": "graftlab.corrections/9", "multipliers": {"a": 1.0}}, "not one this graftlab reads"),
    ({"format": "graftlab.trace/1"}, "not a graftlab corrections file"),
    ({"multipliers": {"a": 1.0}}, "not a graftlab corrections file"),
    ({"format": FORMAT}, "neither multipliers nor a schedule"),
    ({"format": FORMAT, "schedule": {"g": [[5, 1.0]]}}, "must start at step 0"),
    ({"format": FORMAT, "schedule": {"g": [[0, 1.0], [5, 2.0], [5, 3.0]]}}, "starts must increase"),
    ({"format": FORMAT, "schedule": {"g": [[0, 1.0], [2.5, 2.0]]}}, "not a step number"),
    ({"format": FORMAT, "schedule": {"g": []}}, "non-empty list"),
    ({"format": FORMAT, "schedule": {"g": [[0, 1.0, 3]]}}, "expected \\[start, factor\\]"),
    ({"format": FORMAT, "schedule": {"g": [[0, -2.0]]}}, "finite and positive"),
    ([1, 2], "expected a JSON object"),
])
def test_load_rejects(tmp_path, payload, msg):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(payload))  # json writes NaN/Infinity, as a careless tool would
    with pytest.raises(GraftlabError, match=msg) as err:
        load_corrections(p)
    assert "\n" not in str(err.value) and str(p) in str(err.value)


def test_load_rejects_missing_and_garbage(tmp_path):
    with pytest.raises(GraftlabError, match="no such corrections file"):
        load_corrections(tmp_path / "nope.json")
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(GraftlabError, match="not valid JSON"):
        load_corrections(tmp_path / "g.json")


def test_save_rejects_invalid(tmp_path):
    with pytest.raises(GraftlabError, match="finite and positive"):
        save(Corrections(multipliers={"a": math.nan}), tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_apply_static_multipliers():
    m = model()
    a = apply(corr(), list(m.named_parameters()), 0.2)
    assert [g["name"] for g in a.param_groups] == NAMES
    assert [g["lr"] for g in a.param_groups] == pytest.approx([100.0, 2.0, 0.02, 0.2], rel=1e-15)
    assert all(len(g["params"]) == 1 for g in a.param_groups)
    assert a.lr_factor is None and a.group_lr_factors is None and a.missing == []
    opt = torch.optim.SGD(a.param_groups, lr=0.2, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([100.0, 2.0, 0.02, 0.2])


def test_apply_global_schedule_with_lambda_lr():
    m = model()
    c = Corrections(schedule={"global": [[0, 0.5], [3, 2.0], [5, 0.25]]})
    a = apply(c, list(m.named_parameters()), 0.1)
    assert a.lr_factor is not None and a.group_lr_factors is None
    assert [a.lr_factor(s) for s in range(7)] == [0.5, 0.5, 0.5, 2.0, 2.0, 0.25, 0.25]
    opt = torch.optim.SGD(a.param_groups, lr=0.1)
    run = lambda s: 1.0 / (1 + s)  # noqa: E731 - the run's own schedule
    sched = torch.optim.lr_scheduler.LambdaLR(opt, a.lr_lambda(run))
    seen = []
    for step in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [0.1 * a.lr_factor(s) * run(s) for s in range(7)]
    assert seen == pytest.approx(want, rel=1e-12)
    sched.state_dict()  # picklable pieces, not lambdas


def test_apply_per_group_schedules():
    m = model()
    c = Corrections(
        multipliers={"0.weight": 10.0, "0.bias": 1.0, "2.weight": 1.0, "2.bias": 1.0},
        schedule={"0.weight": [[0, 1.0], [2, 3.0]], "global": [[0, 2.0]]},
    )
    a = apply(c, list(m.named_parameters()), 0.1)
    assert a.lr_factor is None and len(a.group_lr_factors) == 4
    assert a.factor_at(0) == [20.0, 2.0, 2.0, 2.0]
    assert a.factor_at(5) == [60.0, 2.0, 2.0, 2.0]
    opt = torch.optim.SGD(a.param_groups, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, a.lr_lambda())
    for _ in range(3):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * f for f in a.factor_at(3)])


def test_apply_custom_partition_members():
    m = model()
    c = Corrections(multipliers={"first": 3.0, "second": 5.0},
                    source={"groups": {"first": {"members": ["0.weight", "0.bias"]},
                                       "second": {"members": ["2.weight", "2.bias"]}}})
    a = apply(c, list(m.named_parameters()), 1.0)
    assert [g["lr"] for g in a.param_groups] == [3.0, 3.0, 5.0, 5.0]


def test_apply_unknown_and_missing_groups():
    m = model()
    other = Corrections(multipliers={"encoder.layer.0.attention.self.query.weight": 500.0, "emb.weight": 10.0})
    with pytest.raises(GraftlabError, match="another model.*encoder.layer.0") as err:
        apply(other, list(m.named_parameters()), 0.1)
    assert "\n" not in str(err.value)
    partial = Corrections(multipliers={"0.weight": 5.0, "stray": 2.0})
    with pytest.raises(GraftlabError, match="stray"):
        apply(partial, list(m.named_parameters()), 0.1)
    only = Corrections(multipliers={"0.weight": 5.0})
    with pytest.raises(GraftlabError, match="3 model parameter.*0.bias, 2.weight, 2.bias"):
        apply(only, list(m.named_parameters()), 0.1)
    with pytest.warns(UserWarning, match="3 of 4 parameter tensors have no factor.*1 of 2 file group"):
        a = apply(partial, list(m.named_parameters()), 0.1, allow_missing=True)
    assert a.missing == ["0.bias", "2.weight", "2.bias"] and a.unknown == ["stray"]
    assert [g["lr"] for g in a.param_groups] == pytest.approx([0.5, 0.1, 0.1, 0.1])
    with pytest.raises(GraftlabError, match="base learning rate"):
        apply(only, list(m.named_parameters()), float("nan"), allow_missing=True)


def test_apply_global_static_multiplier():
    m = model()
    a = apply(Corrections(multipliers={"global": 0.25}), list(m.named_parameters()), 0.4)
    assert [g["lr"] for g in a.param_groups] == [0.1] * 4 and a.missing == []


def test_apply_names_the_mistake_of_passing_parameters():
    m = model()
    for params in (list(m.parameters()), [m[0].weight]):
        with pytest.raises(GraftlabError, match=r"\(name, parameter\) pairs.*item 0 is a Parameter") as err:
            apply(corr(), params, 0.1)
        assert "\n" not in str(err.value)
    a = apply(corr(), m.named_parameters(), 0.1)  # any iterable of pairs, a generator included
    assert [g["name"] for g in a.param_groups] == NAMES


def test_group_source_records_are_typed_and_validated(tmp_path):
    from graftlab.corrections import GroupSource

    c = corr()
    c.source["groups"]["0.weight"] = {"kind": "Q", "block": 2, "tied": True, "median": 480.5, "factor": 500.0,
                                      "n_finite": 99, "n_nonfinite": 1, "later_median": None, "drift": None,
                                      "flags": "", "future_key": "kept for newer writers"}
    back = load_corrections(save(c, tmp_path / "c.json"))
    rec = back.group_sources["0.weight"]
    assert rec == GroupSource(kind="Q", block=2, tied=True, median=480.5, factor=500.0, n_finite=99, n_nonfinite=1)
    assert back.group_sources["0.bias"] == GroupSource(kind="ffn")
    assert back.summary().set_index("group").loc["0.weight", "median"] == 480.5
    assert GroupSource(members=["a", "b"], stand_in=None).to_dict()["members"] == ["a", "b"]
    assert "stand_in" not in GroupSource().to_dict() and "members" not in GroupSource().to_dict()
    for bad, msg in [({"median": "big"}, r"source.groups\['g'\].median must be a finite number"),
                     ({"n_finite": -3}, "n_finite must be a whole number >= 0"),
                     ({"tied": "yes"}, "tied must be true or false"),
                     ({"members": "0.weight"}, "members must be a list of parameter names"),
                     ([1], r"source.groups\['g'\] must be an object")]:
        p = tmp_path / "bad.json"
        p.write_text(json.dumps({"format": FORMAT, "multipliers": {"g": 1.0}, "source": {"groups": {"g": bad}}}))
        with pytest.raises(GraftlabError, match=msg) as err:
            load_corrections(p)
        assert str(p) in str(err.value) and "\n" not in str(err.value)



@pytest.mark.parametrize("kind", ["static", "per-group schedule", "global schedule"])
@pytest.mark.parametrize("with_run_schedule", [False, True])
def test_corrections_scheduler_checkpoints_with_torch_save_and_resumes_exactly(kind, with_run_schedule):
    """A LambdaLR built from apply(...).lr_lambda(...) (holding a user's lambda or not) goes through
    torch.save / torch.load with torch's defaults, and the resumed scheduler gives the same lrs."""
    import io

    from graftlab.corrections import Corrections, apply

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    names = [n for n, _ in m.named_parameters()]
    corr = {
        "static": Corrections(multipliers={n: 2.0 for n in names}),
        "per-group schedule": Corrections(schedule={n: [[0, 1.0], [5, 0.5 + i]] for i, n in enumerate(names)}),
        "global schedule": Corrections(schedule={"global": [[0, 1.0], [5, 0.5]]}),
    }[kind]
    run = (lambda t: min(1.0, (t + 1) / 10)) if with_run_schedule else None  # noqa: E731

    def build():
        ap = apply(corr, list(m.named_parameters()), 0.1)
        opt = torch.optim.SGD(ap.param_groups, lr=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, ap.lr_lambda(run))

    opt, sched = build()
    for _ in range(3):
        opt.step(); sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf)  # weights_only=True, torch's default
    opt2, sched2 = build()
    opt2.load_state_dict(state["opt"]); sched2.load_state_dict(state["sched"])
    for _ in range(6):
        opt.step(); sched.step(); opt2.step(); sched2.step()
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
