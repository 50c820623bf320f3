"""``source["groups"]`` at the sizes finer partitions give (10^4 to 10^6 records): checked a field at a
time, with the same verdicts and messages as the record-by-record check, and saved without a copy."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from graftlab.corrections import FORMAT, Corrections, GroupSource, load_corrections, save
from graftlab.corrections.group_sources import group_sources
from graftlab.errors import GraftlabError

N = 3000


def records(n: int = N) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for i, m in enumerate(rng.lognormal(0, 1, n).tolist()):
        out[f"encoder.layer.{i % 12}.attention.self.query.weight[rows {i}]"] = {
            "kind": "Q", "block": i % 12, "tied": bool(i % 2), "median": m, "factor": m, "n_finite": 20,
            "n_nonfinite": 0, "later_median": None if i % 7 == 0 else m * 1.5, "drift": None if i % 7 == 0 else 1.5,
            "flags": "", "grad_share": None}
    g = next(iter(out))
    out[g].update(flags="degenerate", stand_in=0.5, evidence={"basis": "gradient", "grad_share": 1e-9})
    return out


def file_with(groups: dict) -> Corrections:
    return Corrections(multipliers={g: 1.0 for g in groups}, source={"groups": groups})


def test_plain_records_are_checked_at_once_and_saved_as_they_are(tmp_path):
    recs = records()
    sources = group_sources({"groups": recs})
    assert sources.plain and len(sources) == N and list(sources) == list(recs)
    g = list(recs)[5]
    assert sources[g] == GroupSource(**recs[g])
    back = load_corrections(save(file_with(recs), tmp_path / "c.json"))
    assert back.source["groups"] == recs  # every record, every field, key order included
    assert [list(r) for r in back.source["groups"].values()] == [list(r) for r in recs.values()]
    assert back.group_sources == sources


@pytest.mark.parametrize("change, plain", [
    ({"median": np.float32(2.5)}, False),  # a numpy number: converted on the per-record path
    ({"median": 3}, False),  # an int in a float field (JSON writes 3 for 3.0)
    ({"n_finite": 20.0}, False),  # a float in an int field
    ({"median": float("nan")}, False),  # NaN: null in strict JSON
    ({"evidence": {"x": float("nan")}}, False),
    ({"future_key": np.int64(1)}, False),  # unknown keys are kept for newer writers, made JSON
    ({"members": ["a", "b"]}, True),
])
def test_records_that_need_converting_take_the_record_path_and_save_the_same(tmp_path, change, plain):
    recs = records()
    g = list(recs)[N // 2]
    recs[g] = {**recs[g], **change}
    sources = group_sources({"groups": recs})
    assert sources.plain is plain
    back = load_corrections(save(file_with(recs), tmp_path / "c.json"))
    saved = back.source["groups"][g]
    for key, value in change.items():
        if key == "future_key":
            assert saved[key] == 1
        elif isinstance(value, dict):
            assert saved[key] == {"x": None}
        elif isinstance(value, float) and math.isnan(value):
            assert saved[key] is None and back.group_sources[g].median is None
        else:
            assert saved[key] == value and back.group_sources[g].to_dict()[key] == value
    assert type(back.group_sources[g].median) in (float, type(None))  # typed on lookup: 3 -> 3.0
    assert type(back.group_sources[g].n_finite) is int


@pytest.mark.parametrize("bad, msg", [
    ({"median": "big"}, r"\.median must be a finite number or null, got 'big'"),
    ({"median": float("inf")}, None),  # inf: made null like NaN (strict JSON)
    ({"n_finite": -3}, r"\.n_finite must be a whole number >= 0"),
    ({"n_finite": True}, r"\.n_finite must be a whole number >= 0"),
    ({"tied": "yes"}, r"\.tied must be true or false"),
    ({"members": ["a", 3]}, r"\.members must be a list of parameter names"),
    ({"block": 10 ** 400}, r"\.block must be a whole number >= 0"),
])
def test_one_bad_record_among_many_is_named(tmp_path, bad, msg):
    recs = records()
    g = list(recs)[N - 10]
    recs[g] = {**recs[g], **bad}
    if msg is None:
        assert load_corrections(save(file_with(recs), tmp_path / "c.json")).source["groups"][g]["median"] is None
        return
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"format": FORMAT, "multipliers": {"x": 1.0}, "source": {"groups": recs}}))
    with pytest.raises(GraftlabError, match=msg) as err:
        load_corrections(p)
    assert f"source.groups[{g!r}]" in str(err.value) and str(p) in str(err.value)
    with pytest.raises(GraftlabError, match=msg):  # save refuses it before touching the disk
        save(file_with(recs), tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_a_record_that_is_not_an_object_is_named(tmp_path):
    recs = records()
    g = list(recs)[7]
    recs[g] = [1]
    with pytest.raises(GraftlabError, match=re.escape(f"source.groups[{g!r}] must be an object")):
        group_sources({"groups": recs})


def test_many_static_factors_are_checked_as_one_array(tmp_path):
    groups = {f"g{i}": 1.0 + i for i in range(N)}
    p = save(Corrections(multipliers=groups), tmp_path / "c.json")
    assert load_corrections(p).multipliers == groups
    for bad, msg in [(0.0, "must be finite and positive"), (float("nan"), "must be finite and positive"),
                     (1e-320, "subnormal"), ("2", "not a number"), (True, "not a number")]:
        groups["g1500"] = bad
        p.write_text(json.dumps({"format": FORMAT, "multipliers": groups}))
        with pytest.raises(GraftlabError, match=f"multiplier of g1500 is .*{msg}"):
            load_corrections(p)


@pytest.mark.parametrize("bad, says", [({"multipliers": {"weight": float("nan")}}, "multiplier of weight is nan"),
                                       ({"multipliers": {"weight": True}}, "multiplier of weight is True, not a number"),
                                       ({"multipliers": {"weight": "3"}}, "multiplier of weight is '3', not a number"),
                                       ({"multipliers": {"weight": None}}, "multiplier of weight is None, not a number"),
                                       ({"multipliers": {"weight": -1.0}}, "multiplier of weight is -1.0"),
                                       ({"schedule": {"weight": [[5, 1.0]]}}, "must start at step 0, not 5"),
                                       ({"multipliers": {"weight": 1.0}, "source": {"groups": {"weight": {"median": "x"}}}},
                                        r"source.groups\['weight'\].median must be a finite number")])
def test_corrections_built_in_python_are_checked_as_a_file_is_before_applying(bad, says):
    import torch

    from graftlab.corrections import apply

    model = torch.nn.Linear(2, 2)
    with pytest.raises(GraftlabError, match=says):
        apply(Corrections(**bad), model.named_parameters(), 0.1, allow_missing=True)
    with pytest.raises(GraftlabError, match=says):
        Corrections(**bad).validate()


def test_numpy_factors_built_in_python_are_numbers(tmp_path):
    import torch

    from graftlab.corrections import apply

    model = torch.nn.Linear(2, 2)
    corr = Corrections(multipliers={"weight": np.float32(2.0)}, schedule={"bias": [[np.int64(0), np.float64(3.0)]]})
    applied = apply(corr, model.named_parameters(), 0.1)
    assert applied.param_groups[0]["lr"] == pytest.approx(0.2)
    assert load_corrections(save(corr, tmp_path / "c.json")).multipliers == {"weight": 2.0}
