"""Names from a user's data reach the terminal as data: control characters escaped, very long names
cut in tables (the files keep every name whole)."""
from __future__ import annotations

import json
import shlex

import numpy as np
import pandas as pd

from graftlab.cli.app import run
from graftlab.cli.text import printable

NAMES = ["esc\x1b[31mred\x1b]0;title\x07.weight", "nul\x00byte.weight", "line\nbreak.weight", "é漢.weight", "x" * 5000]


def test_printable_escapes_control_characters_and_cuts_long_names():
    assert printable("a\x1b[31mb\x00\n\x7f") == "a\\x1b[31mb\\x00\\n\\x7f"
    assert printable("é漢 ok") == "é漢 ok"
    assert printable("abc\u202edcba\u200b") == "abc\\u202edcba\\u200b"  # no name displays as another
    assert printable("x" * 300) == "x" * 200 + "... (100 more characters)"


def test_info_distill_show_and_errors_print_no_control_characters(tmp_path, capsysbinary):
    table = tmp_path / "t.parquet"
    pd.DataFrame({"step": np.repeat(np.arange(4), len(NAMES)), "group": NAMES * 4, "ratio": 2.0}).to_parquet(table)
    out = tmp_path / "c.json"
    for argv in (f"info {table}", f"distill {table} --window 2 -o {out}", f"show {out}"):
        assert run(shlex.split(argv)) == 0
        printed = capsysbinary.readouterr()
        text = printed.out + printed.err
        assert not any(c in text for c in (b"\x1b", b"\x00", b"\x07")), argv
        assert b"esc\\x1b[31mred" in text and len(text) < 100_000, argv
    assert set(json.loads(out.read_text())["multipliers"]) == set(NAMES)  # the file keeps every name whole
    # an error line naming a group does not carry its control characters either
    bad = tmp_path / "negative.parquet"
    pd.DataFrame({"step": [0, 1, 0, 1], "group": [NAMES[0]] * 2 + ["ok"] * 2, "ratio": [-1.0, -1.0, 2.0, 2.0]}).to_parquet(bad)
    assert run(shlex.split(f"distill {bad} --window 2 -o {tmp_path / 'n.json'}")) == 2
    err = capsysbinary.readouterr().err
    assert err.startswith(b"error: ") and b"negative ratios" in err and b"esc\\x1b[31mred" in err
    assert b"\x1b" not in err and len(err.strip().splitlines()) == 1
