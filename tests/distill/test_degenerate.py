"""Degenerate groups come from what D's step is made of, not from where a ratio sits among the others.

Real traces: tests/data/hf-bert-2x64 and hf-gpt2-2x64 are Hugging Face BertForMaskedLM / GPT2LMHeadModel
(2 layers, d=64, built from configs) trained 120 steps with Adam 1e-3 # SGD 0.1 momentum 0.9,
layer-wise, recorded by tests/data/make_hf_traces.py (the slow tests below record the same at a
reduced size).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import graftlab
from graftlab.cli.app import app
from graftlab import trace
from graftlab.distill import degenerate
from graftlab.corrections import load_corrections
from graftlab.distill.pipeline import distill
from graftlab.record.recorder import Recorder
from tests import models

DATA = Path(__file__).resolve().parents[1] / "data"
ROOT = Path(__file__).resolve().parents[2]
HF_BERT = DATA / "hf-bert-2x64"
HF_GPT2 = DATA / "hf-gpt2-2x64"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------- recording norm_g

def _record_block(path, steps, *, every=1, grad_every=3, granularity="layer"):
    """Train tests.models' block, recording; return the float64 reference gradient norms per step."""
    torch.set_num_threads(1)
    model = models.make("block", dtype=torch.float32)
    model.extra = torch.nn.Parameter(torch.ones(3))  # never used: no gradient, counts as zero
    opt = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2),
                         torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                         granularity=granularity, names=model)
    ref = []
    with Recorder(opt, path, every=every, flush_every=4, model=model, grad_every=grad_every) as rec:
        for x, y in models.batches("block", steps, dtype=torch.float32):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            ref.append([0.0 if p.grad is None else p.grad.double().norm().item() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss.detach())
    return opt, np.array(ref)


def test_recorder_writes_group_gradient_norms(tmp_path):
    opt, ref = _record_block(tmp_path / "t", 13, every=2, grad_every=3)
    df = trace.read_trace(tmp_path / "t")
    g = len(opt.group_names)
    assert df["norm_g"].dtype == np.float32
    got = df["norm_g"].to_numpy().reshape(-1, g)
    steps = df["step"].to_numpy().reshape(-1, g)[:, 0]
    assert list(steps) == list(range(0, 13, 2))
    for row, s in zip(got, steps):
        if s % 6 == 0:  # every 3rd recorded step
            np.testing.assert_allclose(row, ref[s], rtol=2e-6)
        else:
            assert np.isnan(row).all()
    assert got[0][list(opt.group_names).index("extra")] == 0.0


def test_recorder_gradient_norms_of_multi_tensor_groups_and_off(tmp_path):
    opt, ref = _record_block(tmp_path / "g", 4, grad_every=1, granularity="global")
    df = trace.read_trace(tmp_path / "g")
    np.testing.assert_allclose(df["norm_g"].to_numpy(), np.sqrt((ref**2).sum(1)), rtol=2e-6)
    _record_block(tmp_path / "off", 3, grad_every=0)
    assert "norm_g" not in trace.read_trace(tmp_path / "off").columns
    with pytest.raises(graftlab.GraftlabError, match="grad_every"):
        Recorder(opt, tmp_path / "bad", grad_every=-1)


# --------------------------------------------------------------------------- the rules

def test_gradient_shares_against_a_direct_reference():
    rng = np.random.default_rng(0)
    groups = ["a", "b.bias", "c"]
    rows = []
    for s in range(7):
        for gi, g in enumerate(groups):
            v = rng.uniform(0.1, 2.0) * (1e-12 if g == "b.bias" else 1.0)
            rows.append((s, g, np.nan if (s % 3 and gi == 0) else v))  # "a" only recorded on some steps
    df = pd.DataFrame(rows, columns=["step", "group", "norm_g"])
    want = {}
    for g in groups:
        vals = []
        for s, part in df.groupby("step"):
            ok = part[np.isfinite(part.norm_g)]
            total = np.sqrt((ok.norm_g**2).sum())
            v = part.set_index("group").norm_g[g]
            if np.isfinite(v):
                vals.append(v / total)
        want[g] = np.median(vals)
    got = degenerate.gradient_shares(df)
    assert list(got.index) == groups
    for g in groups:
        assert got[g] == pytest.approx(want[g], rel=1e-12)
    assert degenerate.gradient_shares(df.drop(columns="norm_g")) is None
    assert degenerate.gradient_shares(df.assign(norm_g=np.nan)) is None


def test_assess_rules():
    med = pd.Series({"l.key.weight": 400.0, "l.key.bias": 1.0e5, "l.query.weight": 500.0, "l.value.weight": 4.0,
                     "ln.weight": 0.5, "emb.weight": 0.3, "m.key.bias": 300.0, "m.key.weight": 250.0,
                     "solo.key.bias": 1e5})
    kinds = {n: ("K" if ".key." in n else "Q" if "query" in n else "V" if "value" in n else "other") for n in med.index}
    # ratios only: the key bias far above its own weight; a key bias with a real-looking ratio (a
    # rotary model's), and one without its weight in the trace, are kept; Q/K weights at 400-500 too
    ev = degenerate.assess(med, kinds)
    assert {g for g, e in ev.items() if e.degenerate} == {"l.key.bias"}
    e = ev["l.key.bias"]
    assert e.basis == "structure" and e.sibling == "l.key.weight" and e.sibling_factor == pytest.approx(250.0)
    assert "250x" in e.reason() and "key bias" in e.short()
    assert ev["solo.key.bias"].structure is not None and not ev["solo.key.bias"].degenerate
    # gradients decide alone when they are there: the big-ratio key bias with a real gradient is kept,
    # a group of any kind whose gradient is float noise is flagged
    shares = pd.Series(0.01, index=med.index)
    shares["l.key.bias"] = 0.2
    shares["emb.weight"] = 3e-9
    ev = degenerate.assess(med, kinds, shares=shares)
    assert {g for g, e in ev.items() if e.degenerate} == {"emb.weight"}
    assert ev["emb.weight"].basis == "gradient" and "3e-09" in ev["emb.weight"].reason()
    assert json.dumps(ev["emb.weight"].to_dict())  # JSON-ready evidence
    # the outlier rule only when asked for
    ev = degenerate.assess(med, kinds, shares=pd.Series(0.01, index=med.index), outlier=100.0)
    assert {g for g, e in ev.items() if e.degenerate} == {"l.key.bias", "solo.key.bias"}
    assert ev["solo.key.bias"].basis == "outlier"


def test_live_block_flags_only_the_key_bias_from_its_gradient(tmp_path):
    _record_block(tmp_path / "t", 20, grad_every=2)
    corr = distill(tmp_path / "t", window=20)
    info = corr.source["groups"]
    assert corr.source["flagged"] == {"key.bias": "degenerate", "extra": "no finite ratio"}
    assert info["key.bias"]["evidence"]["basis"] == "gradient"
    assert info["key.bias"]["grad_share"] < degenerate.NOISE_SHARE
    assert min(d["grad_share"] for g, d in info.items() if g not in ("key.bias", "extra")) > 1e-4
    assert corr.source["degenerate"]["basis"] == "gradient"


# --------------------------------------------------------------------------- real traces

def _without_norm_g(src: Path, dst: Path) -> Path:
    """A copy of a graftlab trace as it was recorded before norm_g existed."""
    shutil.copytree(src, dst)
    for part in sorted(dst.glob(trace.PART_GLOB)):
        table = pq.read_table(part)
        trace.write_table(table.drop_columns(["norm_g"]), part)
    return dst


def _check_hf_bert(corr, basis):
    info = corr.source["groups"]
    flagged = {g for g, d in info.items() if d["flags"]}
    assert flagged == {f"bert.encoder.layer.{i}.attention.self.key.bias" for i in (0, 1)}
    for g in flagged:
        assert info[g]["evidence"]["basis"] == basis and info[g]["evidence"]["reason"]
        assert info[g]["median"] > 1e4
    for i in (0, 1):
        for leaf in ("query", "key", "value"):
            g = f"bert.encoder.layer.{i}.attention.self.{leaf}.weight"
            assert not info[g]["flags"]
            assert corr.multipliers[g] == pytest.approx(info[g]["median"], rel=1e-12)  # its own median
    qk = [info[f"bert.encoder.layer.{i}.attention.self.{leaf}.weight"]["median"] for i in (0, 1) for leaf in ("query", "key")]
    model = np.median([d["median"] for d in info.values()])
    assert min(qk) > 90 and max(qk) / model > 500  # large real corrections, kept


def test_hf_bert_trace_keeps_every_qkv_weight_and_flags_the_key_biases(tmp_path):
    out = tmp_path / "c.json"
    res = cli("distill", HF_BERT, "--window", 60, "-o", out)
    assert res.exit_code == 0, res.output
    _check_hf_bert(load_corrections(out), "gradient")
    assert res.output.count("degenerate (|g|") == 2 and "gradient is float noise" in res.output
    # the same trace without its gradient norms: structure and ratio find the same groups
    old = _without_norm_g(HF_BERT, tmp_path / "old")
    res = cli("distill", old, "--window", 60, "-o", tmp_path / "o.json")
    assert res.exit_code == 0, res.output
    corr = load_corrections(tmp_path / "o.json")
    _check_hf_bert(corr, "structure")
    assert corr.source["degenerate"]["basis"] == "structure" and "key bias" in res.output
    # the old ratio threshold is still there on request, and it would take the Q weights with it
    res = cli("distill", HF_BERT, "--window", 60, "-o", tmp_path / "x.json", "--outlier", 100)
    flagged = load_corrections(tmp_path / "x.json").source["flagged"]
    assert "bert.encoder.layer.1.attention.self.query.weight" in flagged


def test_hf_gpt2_trace_flags_nothing():
    # GPT-2's fused c_attn carries Q's and V's real gradients: nothing in it is gradient-free
    corr = distill(HF_GPT2, window=60)
    assert corr.source["flagged"] == {}
    shares = [d["grad_share"] for d in corr.source["groups"].values()]
    assert min(shares) > 1e-4


def test_builtin_bert_sample_trace_flags_only_key_biases():
    # recorded before norm_g existed: structure and ratio decide
    corr = distill(ROOT / "sample_traces" / "bert-adam-sgd-bs16", window=500)
    assert set(corr.source["flagged"]) == {f"blocks.{i}.attn.key.bias" for i in range(3)}
    info = corr.source["groups"]
    assert all(info[f"blocks.{i}.attn.{leaf}.weight"]["median"] > 100 for i in range(3) for leaf in ("query", "key"))


@pytest.mark.slow
def test_hf_models_recorded_live(tmp_path):
    pytest.importorskip("transformers")
    from tests.data.make_hf_traces import record

    record("bert", tmp_path / "bert", steps=24, batch=8, seq=32, grad_every=4)
    _check_hf_bert(distill(tmp_path / "bert", window=12), "gradient")
    record("gpt2", tmp_path / "gpt2", steps=12, batch=8, seq=32, grad_every=4)
    # c_attn is grafted as its Q/K/V slices (Graft's default split): the K bias slice is gradient-free
    # (softmax is shift-invariant) and is the only group flagged; every weight slice is kept
    corr = distill(tmp_path / "gpt2", window=12)
    assert set(corr.source["flagged"]) == {f"transformer.h.{i}.attn.c_attn.bias[k]" for i in range(2)}
    assert {d["evidence"]["basis"] for d in corr.source["groups"].values() if d["flags"]} == {"gradient"}


@pytest.mark.slow
def test_builtin_tasks_recorded_live(tmp_path):
    from graftlab.runs import RecordConfig
    from graftlab.runs import record

    res = record(RecordConfig(task="bert", steps=12, batch_size=4, eval_every=0, eval_size=8, device="cpu",
                              threads=1, out=str(tmp_path / "bert")), progress=False)
    assert set(res.summary.attrs["flagged"]) == {f"blocks.{i}.attn.key.bias" for i in range(3)}
    corr = distill(tmp_path / "bert", window=12)
    assert set(corr.source["flagged"]) == {f"blocks.{i}.attn.key.bias" for i in range(3)}
    assert {d["evidence"]["basis"] for d in corr.source["groups"].values() if d["flags"]} == {"gradient"}
    res = record(RecordConfig(task="resnet", steps=6, batch_size=16, eval_every=0, eval_size=16, device="cpu",
                              threads=1, out=str(tmp_path / "resnet")), progress=False)
    assert res.summary.attrs["flagged"] == {}
    assert distill(tmp_path / "resnet", window=6).source["flagged"] == {}


# --------------------------------------------------------------------------- reduced precision

def _record_task(path, task_name, steps, *, dtype=None, autocast=None):
    """A grafted run of a built-in task (tiny) in ``dtype`` weights or under CPU ``autocast``."""
    import contextlib

    from graftlab.tasks import get_task

    torch.set_num_threads(1)
    task = get_task(task_name, size="tiny", batch_size=16, seed=0, device="cpu")
    model = task.model if dtype is None else task.model.to(dtype)
    opt = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-3),
                         torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), names=model)
    meta = {} if autocast is None else {"precision": str(autocast).removeprefix("torch.")}
    amp = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else contextlib.nullcontext
    batches = task.train_batches()
    with Recorder(opt, path, model=model, grad_every=1, metadata=meta) as rec:
        for _ in range(steps):
            with amp():
                loss = task.loss(model, next(batches))
            loss.float().backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss.detach().float())


def _check_reduced_precision(path, precision, key_biases, window):
    assert trace.read_metadata(path)["precision"] == precision
    corr = distill(path, window=window)
    info = corr.source["groups"]
    assert set(corr.source["flagged"]) == key_biases
    for g in key_biases:
        ev = info[g]["evidence"]
        assert ev["basis"] == "gradient" and ev["precision"] == precision
        # the float32 bound would miss at least one: its noise is the coarser dtype's rounding
        assert degenerate.NOISE_SHARE < ev["noise_share"]
        assert info[g]["grad_share"] < ev["noise_share"] and precision in ev["reason"]
    qkv = [g for g in info if g.endswith(".weight") and any(f".{x}." in g for x in ("query", "key", "value"))]
    assert len(qkv) == 3 * len(key_biases)
    for g in qkv:  # every Q/K/V weight is a real gradient, kept with its own median
        assert not info[g]["flags"] and info[g]["grad_share"] > 100 * degenerate.NOISE_SHARE
        assert corr.multipliers[g] == pytest.approx(info[g]["median"], rel=1e-12)
    summary = graftlab.distill.analysis.kind_summary(trace.read_trace(path))
    assert set(summary.attrs["flagged"]) == key_biases
    return info


def test_bfloat16_run_flags_the_key_biases_and_keeps_every_qkv_weight(tmp_path):
    # gpt tiny in bfloat16, 20 steps: key-bias shares 2.6e-7 and 2.7e-7, above float32's 1.2e-7
    _record_task(tmp_path / "t", "gpt", 20, dtype=torch.bfloat16)
    info = _check_reduced_precision(tmp_path / "t", "bfloat16", {f"blocks.{i}.attn.key.bias" for i in (0, 1)}, 20)
    assert max(info[f"blocks.{i}.attn.key.bias"]["grad_share"] for i in (0, 1)) > degenerate.NOISE_SHARE


def test_bfloat16_autocast_run_says_its_precision(tmp_path):
    # float32 weights, bert tiny under CPU bfloat16 autocast: the run passes its precision
    _record_task(tmp_path / "t", "bert", 12, autocast=torch.bfloat16)
    _check_reduced_precision(tmp_path / "t", "bfloat16", {f"blocks.{i}.attn.key.bias" for i in range(3)}, 12)


def test_noise_share_follows_the_precision():
    kb = degenerate.gradient_free("a.key.bias", "K")
    assert degenerate.noise_share(None, kb) == degenerate.noise_share("float32", kb) == 2.0 ** -23
    assert degenerate.noise_share("float64", kb) == 2.0 ** -23  # never below float32's
    assert degenerate.noise_share("bfloat16", kb) == pytest.approx(torch.finfo(torch.bfloat16).eps / 128)
    assert degenerate.noise_share("float16", kb) == pytest.approx(torch.finfo(torch.float16).eps / 128)
    assert degenerate.noise_share("bfloat16", None) == 2.0 ** -23  # a group with a real gradient
    assert degenerate.noise_share("int8", kb) == 2.0 ** -23  # unknown: float32's


def _assess_one_by_one(med, kinds, shares=None, outlier=None, precision=None):
    """The rules of the module doc applied group by group: the reference for the array version."""
    import math

    by_name = {str(g): float(v) for g, v in med.items()}
    usable = [v for v in by_name.values() if math.isfinite(v) and v > 0]
    ref = float(np.median(usable)) if outlier and len(usable) >= 3 else None
    out = {}
    for g, m in by_name.items():
        share = None if shares is None else float(shares.get(g, np.nan))
        share = share if share is not None and math.isfinite(share) else None
        structure = degenerate.gradient_free(g, kinds.get(g))
        sib = degenerate.sibling(g, by_name)
        sib_factor = (m / by_name[sib] if sib is not None and math.isfinite(by_name[sib]) and by_name[sib] > 0
                      and math.isfinite(m) else None)
        outlier_factor = m / ref if ref and math.isfinite(m) else None
        bound = degenerate.noise_share(precision, structure)
        basis = None
        if math.isfinite(m) and m > 0:
            if share is not None:
                basis = "gradient" if share < bound else None
            elif structure and sib_factor is not None and sib_factor >= degenerate.SIBLING_FACTOR:
                basis = "structure"
            if basis is None and outlier_factor is not None and outlier_factor > outlier:
                basis = "outlier"
        out[g] = degenerate.Evidence(g, basis is not None, basis, share, structure, sib, sib_factor,
                                     outlier_factor, bound, precision)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_shares, outlier, precision", [(False, None, None), (True, None, "bfloat16"),
                                                             (False, 50.0, None), (True, 50.0, "float16")])
def test_assess_over_many_groups_is_the_rules_group_by_group(seed, with_shares, outlier, precision):
    rng = np.random.default_rng(seed)
    names = []
    for layer in range(40):
        for proj in ("query", "key", "value"):
            names += [f"l.{layer}.attention.self.{proj}.weight", f"l.{layer}.attention.self.{proj}.bias",
                      f"l.{layer}.attention.self.{proj}.bias[head 1]"]
    names += ["solo.key.bias", ".bias", "bias", "emb.weight"]
    names = [n for n in names if rng.random() > 0.15]  # some weights missing: biases without a sibling
    values = rng.lognormal(2, 3, len(names))
    values[rng.random(len(names)) < 0.1] = np.nan
    values[rng.random(len(names)) < 0.05] = 0.0
    med = pd.Series(values, index=names)
    kinds = {n: ("K" if ".key." in n else "Q" if "query" in n else "V" if "value" in n else "other") for n in names}
    shares = None
    if with_shares:
        s = 10.0 ** rng.uniform(-12, -2, len(names))
        s[rng.random(len(names)) < 0.1] = np.nan
        shares = pd.Series(s, index=names).iloc[: len(names) - 3]  # a few groups without a share
    got = degenerate.assess(med, kinds, shares=shares, outlier=outlier, precision=precision)
    want = _assess_one_by_one(med, kinds, shares, outlier, precision)
    assert list(got) == list(want) and len(got) == len(want)
    for g in want:
        a, b = got[g], want[g]
        assert (a.degenerate, a.basis, a.structure, a.sibling, a.precision) == \
            (b.degenerate, b.basis, b.structure, b.sibling, b.precision), g
        for f in ("grad_share", "sibling_factor", "outlier_factor", "noise_share"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or x == pytest.approx(y, rel=1e-12), (g, f)
    assert got.degenerate == [g for g in want if want[g].degenerate]
    assert any(e.degenerate for e in want.values())  # the draw exercises the verdicts
