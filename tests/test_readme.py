"""The README's usage example runs as written."""
from __future__ import annotations

import contextlib
import io
import math
import re

import pytest
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


def _distilled(folder: Path) -> None:
    """The two files the README's pipeline commands create, from the bundled bert trace."""
    import graftlab

    trace = README.parent / "sample_traces" / "bert-adam-sgd-bs16"
    (folder / "runs").mkdir()
    graftlab.save_corrections(graftlab.distill_trace(trace, window=150, round="none"),
                              folder / "runs" / "t.corrections.json")
    graftlab.save_corrections(graftlab.distill_trace(trace, window=500, schedule=True),
                              folder / "runs" / "sched.json")


@pytest.mark.slow
def test_own_loop_recipe_applies_static_factors_and_schedules_as_written(tmp_path, monkeypatch):
    import torch

    torch.set_num_threads(1)
    code = _section_code("Corrections in your own training loop")
    _distilled(tmp_path)
    monkeypatch.chdir(tmp_path)
    for path in ("runs/sched.json", "runs/t.corrections.json"):
        scope: dict = {}
        exec(compile(code.replace("runs/sched.json", path), str(README), "exec"), scope)
        applied, opt, corr = scope["applied"], scope["opt"], scope["corr"]
        assert scope["scheduler"].last_epoch == 20
        # every param group's lr is base lr x its factor x the file's schedule at step 20
        want = [0.1 * f for f in applied.factor_at(20)]
        got = [g["lr"] for g in opt.param_groups]
        assert got == pytest.approx(want, rel=1e-12)
        if corr.schedule:  # the schedule really moves the lrs away from the static ones
            assert got != pytest.approx([g["initial_lr"] for g in opt.param_groups])
        else:  # static factors: per-tensor lrs, constant
            assert len(set(got)) > 1 and got == pytest.approx([g["initial_lr"] for g in opt.param_groups])
        assert all(math.isfinite(float(p.detach().sum())) for p in scope["task"].model.parameters())
