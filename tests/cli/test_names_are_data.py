"""Group names are data, never markup nor formulas: ``info``, ``distill`` and ``show`` print them
literally (rich would read ``[/]`` as a closing tag and ``[q]`` as a style), and the CSV export
never starts a cell with a formula character (security probes of the README's reliability table)."""
from __future__ import annotations

import csv

import pytest

from tests.cli.test_bad_inputs import make_trace

NAMES = ["[/]", "transformer.h.0.attn.c_attn.weight[q]", "transformer.h.0.attn.c_attn.weight[k]",
         "[bold red]loud[/bold red]", "=HYPERLINK(\"http://x\",\"y\")", "+1+2", "-2+3", "@SUM(A1:A2)"]
GROUPS = [(n, "other", None, None, 1.0 + i) for i, n in enumerate(NAMES)]


@pytest.fixture
def traced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")
    make_trace(tmp_path / "T", groups=GROUPS)
    return tmp_path


def cli(capsys, *argv):
    from graftlab.cli.app import run

    code = run(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("command", ["info", "distill", "show"])
def test_names_print_literally(traced, capsys, command):
    if command == "info":
        out = cli(capsys, "info", "T", "--groups")
    elif command == "distill":
        out = cli(capsys, "distill", "T", "--window", "10", "--round", "none", "-o", "c.json")
    else:
        cli(capsys, "distill", "T", "--window", "10", "--round", "none", "-o", "c.json")
        out = cli(capsys, "show", "c.json")
    text = " ".join(out.split())
    for name in NAMES:
        assert name in text, (name, out)


@pytest.mark.parametrize("name", [n for n in NAMES if n[0] in "=+-@"])
def test_csv_cells_never_start_a_formula(traced, capsys, name):
    cli(capsys, "distill", "T", "--window", "10", "--round", "none", "--format", "csv", "-o", "c.csv")
    with open(traced / "c.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cells = [r["group"] for r in rows]
    assert "'" + name in cells
    assert not any(c and c[0] in "=+-@\t\r" for r in rows for c in (r["group"], r["kind"]))
