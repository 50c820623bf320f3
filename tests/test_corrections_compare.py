"""``graftlab.corrections.compare`` and ``graftlab show``: corrections files side by side."""
import math

import pytest
from typer.testing import CliRunner

from graftlab.cli.app import app
from graftlab.corrections import Corrections, compare, save
from graftlab.errors import GraftlabError


def corr(factors, medians, drifts, kinds, schedule=None):
    groups = {g: {"kind": kinds[g], "median": medians[g], "drift": drifts[g], "factor": factors.get(g)}
              for g in medians}
    return Corrections(multipliers={} if schedule else dict(factors), schedule=schedule or {},
                       source={"groups": groups, "direction_lr": 0.1})


KINDS = {"q": "Q", "k": "K", "v": "V", "v2": "V"}
A = corr({"q": 8.0, "k": 7.0, "v": 0.8, "v2": 0.6}, {"q": 8.0, "k": 7.0, "v": 0.8, "v2": 0.6},
         {"q": 0.1, "k": 0.2, "v": 0.5, "v2": None}, KINDS)
B = corr({"q": 4.0, "k": 7.0, "v": 1.6}, {"q": 4.0, "k": 7.0, "v": 1.6}, {"q": 0.5, "k": 1.0, "v": 1.0}, KINDS)


def test_two_files_per_group():
    df = compare(A, B, labels=["bs16", "bs64"])
    assert list(df.index) == ["q", "k", "v", "v2"]
    assert df["kind"].tolist() == ["Q", "K", "V", "V"]
    assert df["factor bs16"].tolist() == [8.0, 7.0, 0.8, 0.6]
    assert df["factor bs64"].tolist()[:3] == [4.0, 7.0, 1.6] and math.isnan(df.at["v2", "factor bs64"])
    assert df["factor ratio"].tolist()[:3] == pytest.approx([0.5, 1.0, 2.0])
    assert df.at["q", "drift bs16"] == 0.1 and math.isnan(df.at["v2", "drift bs16"])
    assert "last bs16" not in df.columns  # static files have no schedule column


def test_per_kind_medians_and_schedules():
    df = compare(A, by="kind")
    assert list(df.index) == ["Q", "K", "V"] and df["groups"].tolist() == [1, 1, 2]
    assert df.at["V", "factor A"] == pytest.approx(0.7) and df.at["V", "drift A"] == 0.5
    s = corr({}, {"q": 8.0}, {"q": 0.1}, KINDS, schedule={"q": [[0, 8.0], [100, 2.0]]})
    row = compare(s).loc["q"]
    assert row["factor A"] == 8.0 and row["last A"] == 2.0


def test_bad_calls():
    with pytest.raises(GraftlabError, match="at least one"):
        compare()
    with pytest.raises(GraftlabError, match="by must be"):
        compare(A, by="layer")
    with pytest.raises(GraftlabError, match="one name per"):
        compare(A, B, labels=["x"])


def test_show_command(tmp_path):
    a, b = save(A, tmp_path / "a.json"), save(B, tmp_path / "b.json")
    res = CliRunner().invoke(app, ["show", str(a), str(b)])
    assert res.exit_code == 0, res.output
    assert "factor a" in res.output and "factor b" in res.output and "drift" in res.output
    assert "0.5x" in res.output  # q's factor ratio
    res = CliRunner().invoke(app, ["show", str(a), "--by", "kind"])
    assert res.exit_code == 0 and "groups" in res.output
    res = CliRunner().invoke(app, ["show", str(tmp_path / "none.json")])
    assert res.exit_code != 0 and "no such corrections file" in str(res.exception)
