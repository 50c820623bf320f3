"""The README's usage example runs as written."""
from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> str:
    text = README.read_text()
    section = text.split(f"## {title}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_usage_example_runs_and_prints_per_layer_ratios():
    code = _section_code("Use it in your training loop")
    assert len(code.strip().splitlines()) <= 14
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    ratios = eval(out.getvalue().strip().splitlines()[-1], {"nan": math.nan, "inf": math.inf})
    assert list(ratios) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
