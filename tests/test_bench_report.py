"""bench/report.py: the README's and bench/RESULTS.md's result tables are what the committed
bench/results/*.json say, and a result file becomes a row with one entry."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_committed_tables_match_the_committed_results(capsys):
    report = _report()
    code = report.main(["--check"])
    assert code == 0, capsys.readouterr().err + "\nrun `python bench/report.py` and commit README.md and RESULTS.md"


def test_every_row_reads_its_result_and_says_met_or_missed():
    report = _report()
    for row in report.ROWS:
        res = report.load(row.result)
        if res is None:
            continue  # the row says "not measured"
        fig = row.figure(res)
        assert fig.text and fig.spread
        assert (fig.met is None) == (row.target == "reported"), row.what


def test_a_new_result_file_is_a_row_with_one_entry(tmp_path, monkeypatch):
    """A result of the usual shape (quantiles of per-repeat ratios) becomes a row; a median over
    the target reads missed, even when rounding would show it at the target."""
    report = _report()
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    res = {"machine": {"cpu": "CPU", "cpu_count": 2, "load_avg": [3.25, 2.0, 1.0], "cuda": None},
           "written": "2030-01-02 03:04", "command": "bench/x.py",
           "results": {"a": {"median": 1.0201, "min": 0.9, "max": 1.3}}}
    (tmp_path / "x.json").write_text(json.dumps(res))
    monkeypatch.setattr(report, "ROWS", [report.Row(report.P, "x", "x / baseline",
                                                    report.summary("results.a", "x", "<=", 1.02), "<= 1.02x"),
                                         report.Row(report.P, "missing", "y", report.value("n", ""), "reported")])
    table = report.rows_table(report.P).splitlines()
    assert table[2] == ("| x / baseline | 1.0201x | 0.90x..1.30x | <= 1.02x | **missed** | "
                        "2030-01-02 03:04, CPU, 2 cores, load 3.2 |")
    assert table[3] == "| y | not measured | - | reported | no bench/results/missing.json | - |"


def test_rewrite_touches_only_the_marked_region():
    report = _report()
    text = "before\n<!-- report:t -->\nold\n<!-- /report:t -->\nafter\n"
    assert report.rewrite(text, "t", "new", "f") == "before\n<!-- report:t -->\nnew\n<!-- /report:t -->\nafter\n"
