"""D_beta with only the attention weight matrices tied (DA<beta>) and the tied-spread warning."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from graftlab.distill import analysis
from graftlab.distill.pipeline import distill
from graftlab.errors import GraftlabError
from tests.trace_builder import metadata, write_trace

# a small pre-LN block: Q/K near 200, V/out near 2, FFN near 4, LayerNorms and biases near 0.4
GROUPS = [
    ("embeddings.word.weight", "embedding", None, 0.15),
    ("blocks.0.attn.query.weight", "Q", 0, 220.0),
    ("blocks.0.attn.query.bias", "Q", 0, 0.5),
    ("blocks.0.attn.key.weight", "K", 0, 180.0),
    ("blocks.0.attn.value.weight", "V", 0, 2.3),
    ("blocks.0.attn.out.weight", "attn_out", 0, 1.3),
    ("blocks.0.attn_norm.weight", "norm", 0, 0.4),
    ("blocks.0.ffn.fc1.weight", "ffn", 0, 3.9),
    ("head.decoder.weight", "output", None, 0.09),
]


def test_attention_weights_and_spread():
    names = [g[0] for g in GROUPS]
    kinds = {g[0]: g[1] for g in GROUPS}
    tied = analysis.attention_weights(names, kinds)
    assert [n for n in names if tied[n]] == ["blocks.0.attn.query.weight", "blocks.0.attn.key.weight",
                                             "blocks.0.attn.value.weight", "blocks.0.attn.out.weight"]
    med = pd.Series({g[0]: g[3] for g in GROUPS})
    assert analysis.tied_spread(med, tied) == pytest.approx(220.0 / 1.3, rel=1e-12)
    # NaN and non-positive medians are left out; fewer than two tied values give NaN
    med2 = med.copy()
    med2["blocks.0.attn.out.weight"] = math.nan
    med2["blocks.0.attn.value.weight"] = 0.0
    assert analysis.tied_spread(med2, tied) == pytest.approx(220.0 / 180.0, rel=1e-12)
    assert math.isnan(analysis.tied_spread(med, pd.Series(False, index=names)))


def test_parse_round_da():
    assert analysis.parse_round("DA500") == ("dbeta_attn", 500.0)
    assert analysis.parse_round("da2.5") == ("dbeta_attn", 2.5)
    assert analysis.parse_round("D500") == ("dbeta", 500.0)
    for bad in ("DA0", "DA", "DAx", "DA-3"):
        with pytest.raises(GraftlabError, match="beta"):
            analysis.parse_round(bad)


def _trace(tmp_path, steps=40):
    meta = metadata([{"name": n, "kind": k, "block": b} for n, k, b, _ in GROUPS])
    rng = np.random.default_rng(0)
    base = np.array([g[3] for g in GROUPS])
    ratios = base[None, :] * np.exp(rng.normal(0, 0.05, (steps, len(GROUPS))))
    return write_trace(tmp_path / "t", meta, np.arange(steps), ratios), ratios


def test_distill_da_ties_attention_weights_only(tmp_path):
    trace, ratios = _trace(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        corr = distill(trace, window=20, round="DA50")
    mult = corr.multipliers
    for name in ("blocks.0.attn.query.weight", "blocks.0.attn.key.weight", "blocks.0.attn.value.weight",
                 "blocks.0.attn.out.weight"):
        assert mult[name] == 50.0
    # everything else: its own median rounded down to a power of ten, kept in [0.1, 100]
    med = np.median(ratios[:20], axis=0)
    for i, (name, _, _, _) in enumerate(GROUPS):
        if name.startswith("blocks.0.attn.") and name.endswith("weight"):
            continue
        want = min(max(10.0 ** math.floor(math.log10(med[i])), 0.1), 100.0)
        assert mult[name] == pytest.approx(want, rel=1e-12), name
    spread = corr.source["tied_spread"]
    ref = max(med[1], med[3], med[4], med[5]) / min(med[1], med[3], med[4], med[5])
    assert spread == pytest.approx(ref, rel=1e-6) and spread > 10  # ratios are stored as float32
    assert corr.source["warnings"] and "span" in corr.source["warnings"][0]
    assert any("span" in str(w.message) for w in caught)


def test_distill_paper_rule_warns_and_narrow_tie_does_not(tmp_path):
    trace, ratios = _trace(tmp_path)
    with pytest.warns(UserWarning, match="span"):
        corr = distill(trace, window=20, round="D3")
    assert corr.multipliers["blocks.0.attn_norm.weight"] == 3.0 and corr.multipliers["blocks.0.attn.query.bias"] == 3.0
    med = np.median(ratios[:20], axis=0)
    block = [i for i, g in enumerate(GROUPS) if g[2] is not None]
    assert corr.source["tied_spread"] == pytest.approx(med[block].max() / med[block].min(), rel=1e-6)
    # Q and K weights alone are within 10x: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corr = distill(trace, window=20, round="D200", tie=r"attn\.(query|key)\.weight")
    assert corr.source["warnings"] == [] and corr.source["tied_spread"] < 10
    # rounding without beta computes no spread
    assert distill(trace, window=20, round="pow10").source["tied_spread"] is None


def test_tie_that_matches_nothing_and_wide_filter_warn(tmp_path):
    trace, ratios = _trace(tmp_path)
    with pytest.warns(UserWarning, match="the tie regex 'nomatch' matches none of the 9 group names") as caught:
        corr = distill(trace, window=20, round="D500", tie="nomatch")
    assert not any(corr.source["groups"][g]["tied"] for g in corr.multipliers)
    assert len(caught) == 1 and corr.source["warnings"] == [str(caught[0].message).split(": ", 1)[1]]
    with pytest.warns(UserWarning, match=r"median filter \(width 21\) is wider than the window \(20 steps\)"):
        corr = distill(trace, window=20, round="pow10", filter=21)
    assert len(corr.source["warnings"]) == 1
    # a tie that matches, a filter within the window: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert distill(trace, window=20, round="D200", tie=r"attn\.query\.weight").source["warnings"] == []
        assert distill(trace, window=20, round="pow10", filter=19).source["warnings"] == []
    # a tie without D<beta>/DA<beta> rounding ties nothing, whatever it matches
    for tie in ("nomatch", r"attn\.query\.weight"):
        with pytest.warns(UserWarning, match=r"the tie regex '.*' only applies with D<beta> or DA<beta> rounding; "
                                             r"rounding 'pow10' ties no group"):
            corr = distill(trace, window=20, round="pow10", tie=tie)
        assert len(corr.source["warnings"]) == 1


def test_cli_prints_each_warning_on_one_line(tmp_path):
    import shlex

    trace, _ = _trace(tmp_path)
    argv = f"distill {shlex.quote(str(trace))} --window 5 --round D500 --tie nomatch --filter 7 -o {tmp_path / 'c.json'}"
    res = subprocess.run([sys.executable, "-m", "graftlab", *shlex.split(argv)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "80"}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr, res.stderr  # not Python's two-line format
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 2, res.stdout
    assert "the tie regex 'nomatch' matches none" in lines[0] and "ties no group to beta" in lines[0]
    assert "median filter (width 7) is wider than the window (5 steps)" in lines[1]


def test_cli_warns_of_a_tie_without_dbeta_rounding(tmp_path, capsys):
    from graftlab.cli.app import run

    trace, _ = _trace(tmp_path)
    assert run(["distill", str(trace), "--window", "5", "--tie", "x", "-o", str(tmp_path / "c.json")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    assert lines == ["warning: the tie regex 'x' only applies with D<beta> or DA<beta> rounding; rounding 'none' "
                     "ties no group"]
