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
    assert "factor A" in res.output and "factor B" in res.output and "drift" in res.output
    assert f"A = {a}, B = {b}" in res.output  # the legend
    assert "0.5x" in res.output  # q's factor ratio
    res = CliRunner().invoke(app, ["show", str(a), "--by", "kind"])
    assert res.exit_code == 0 and "groups" in res.output
    res = CliRunner().invoke(app, ["show", str(tmp_path / "none.json")])
    assert res.exit_code != 0 and "no such corrections file" in str(res.exception)


def test_kind_medians_leave_flagged_groups_out():
    """A degenerate K bias (median 1.2e5, factor from the stand-in) does not move the K median."""
    kinds = {"k.w": "K", "k.w2": "K", "k.b": "K", "q.w": "Q"}
    c = corr({"k.w": 500.0, "k.w2": 500.0, "k.b": 500.0, "q.w": 500.0},
             {"k.w": 2000.0, "k.w2": 2162.0, "k.b": 1.243e5, "q.w": 900.0}, {g: 1.0 for g in kinds}, kinds)
    c.source["groups"]["k.b"].update(flags="degenerate", stand_in=2081.0)
    c2 = corr({g: 100.0 for g in kinds}, {"k.w": 700.0, "k.w2": 800.0, "k.b": 600.0, "q.w": 300.0},
              {g: 1.0 for g in kinds}, kinds)  # the same bias unflagged here: left out of both files
    df = compare(c, c2, by="kind")
    assert df.at["K", "median A"] == pytest.approx(2081.0) and df.at["K", "median B"] == pytest.approx(750.0)
    assert df["groups"].tolist() == [2, 1] and df["flagged"].tolist() == [1, 0]
    assert "flagged" not in compare(c).columns  # per group: the flags are not a column


def test_show_by_kind_fits_100_columns(tmp_path):
    import re

    kinds = {f"bert.encoder.layer.{i}.attention.self.{w}": k for i in range(2)
             for w, k in (("query.weight", "Q"), ("key.weight", "K"), ("key.bias", "K"), ("value.weight", "V"))}
    kinds.update({"bert.embeddings.word_embeddings.weight": "embedding", "cls.predictions.bias": "output"})
    files = []
    for j, scale in enumerate((1.0, 0.7)):
        med = {g: scale * (1.243e5 if g.endswith("key.bias") else 941.4 + i) for i, g in enumerate(kinds)}
        c = corr({g: 0.00102 * scale for g in kinds}, med, {g: 0.137 for g in kinds}, kinds)
        for g in kinds:
            if g.endswith("key.bias"):
                c.source["groups"][g].update(flags="degenerate", stand_in=2081.0)
        files.append(save(c, tmp_path / f"run{j}.bs{8192 * (j + 1)}.corrections.json"))
    res = CliRunner().invoke(app, ["show", *map(str, files), "--by", "kind"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    table = [ln for ln in lines if re.match(r"^[┏┃┡│└]", ln)]
    assert table and max(len(ln) for ln in table) <= 100, "\n".join(table)
    assert "…" not in res.output  # no header cut short
    assert any(ln.startswith(f"A = {files[0]}, B = {files[1]}") for ln in lines)
    assert "left out of the kind medians: 2 flagged group(s) (K: 2)" in res.output
    assert "1.243e+05" not in res.output and "1.24e+05" not in res.output


def test_kind_rows_of_two_files_cover_the_same_groups_and_ratio_the_factors_shown():
    """B lacks v2: V's medians are over v alone in both files, the ratio is factor B / factor A of
    the row, and the row says one group was left out."""
    df = compare(A, B, by="kind")
    assert df["groups"].tolist() == [1, 1, 1] and df["partial"].tolist() == [0, 0, 1]
    assert df.at["V", "factor A"] == pytest.approx(0.8) and df.at["V", "factor B"] == pytest.approx(1.6)
    rows = df.dropna(subset=["factor A", "factor B"])
    assert (rows["factor ratio"] == rows["factor B"] / rows["factor A"]).all()
    # a ratio of medians, not a median of ratios: three groups whose own ratios are 1, 1, 4
    kinds = {"a": "V", "b": "V", "c": "V"}
    x = corr({"a": 1.0, "b": 2.0, "c": 3.0}, {g: 1.0 for g in kinds}, {g: 1.0 for g in kinds}, kinds)
    y = corr({"a": 1.0, "b": 2.0, "c": 12.0}, {g: 1.0 for g in kinds}, {g: 1.0 for g in kinds}, kinds)
    row = compare(x, y, by="kind").loc["V"]
    assert row["factor A"] == 2.0 and row["factor B"] == 2.0 and row["factor ratio"] == 1.0
    assert "partial" not in compare(A, by="kind").columns


def test_show_says_which_groups_the_kind_medians_leave_out_and_differing_d_lrs(tmp_path):
    a, b = save(A, tmp_path / "a.json"), save(B, tmp_path / "b.json")
    res = CliRunner().invoke(app, ["show", str(a), str(b), "--by", "kind"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "only some files hold are left out (V: 1)" in res.output
    assert "warning" not in res.output  # both at D lr 0.1
    unknown = Corrections(multipliers=dict(B.multipliers), source={**B.source, "direction_lr": None})
    c = save(unknown, tmp_path / "c.json")
    res = CliRunner().invoke(app, ["show", str(a), str(c)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    warned = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "(A 0.1, B unknown)" in warned[0], res.output
