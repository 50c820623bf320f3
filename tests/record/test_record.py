"""Recorder: rows equal the optimizer's own statistics, every-k, metadata, safety, resume, kill -9."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import graftlab
from graftlab import trace
from graftlab.errors import GraftlabError
from graftlab.record.recorder import Recorder
from tests import models, procs

ROOT = Path(__file__).resolve().parents[2]


def setup(dtype=torch.float32, granularity="layer"):
    torch.set_num_threads(1)
    model = models.make("block", dtype=dtype)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, graftlab.Graft(adam, sgd, granularity=granularity, names=model)


def train(model, opt, n, rec=None, seed=1):
    seen = []
    for x, y in models.batches("block", n, dtype=next(model.parameters()).dtype, seed=seed):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen.append((opt.last_stats.clone(), loss.detach().clone()))
        if rec is not None:
            rec.log(loss=loss.detach())
    return seen


def test_rows_equal_last_stats(tmp_path):
    model, opt = setup()
    with Recorder(opt, tmp_path / "t", flush_every=4, model=model) as rec:
        seen = train(model, opt, 10, rec)
    df = trace.read_trace(tmp_path / "t")
    g = len(opt.group_names)
    assert len(df) == 10 * g
    assert list(df.group[:g]) == list(opt.group_names) == [n for n, _ in model.named_parameters()]
    want = torch.stack([s for s, _ in seen]).numpy()  # (steps, 3, G)
    for row, col in enumerate(("norm_m", "norm_d", "ratio")):
        np.testing.assert_array_equal(df[col].to_numpy().reshape(10, g), want[:, row])
    losses = df.groupby("step")["loss"].first().to_numpy()
    np.testing.assert_array_equal(losses, np.array([float(l) for _, l in seen], dtype=np.float32))
    assert (df["lr"] == 1e-2).all()
    assert sorted(p.name for p in (tmp_path / "t").glob("part-*")) == [
        "part-000000000000.parquet", "part-000000000004.parquet", "part-000000000008.parquet"]


def test_float64_parameters_and_pandas_agree(tmp_path):
    model, opt = setup(dtype=torch.float64)
    with Recorder(opt, tmp_path / "t", flush_every=3) as rec:
        seen = train(model, opt, 5, rec)
    df = trace.read_trace(tmp_path / "t")
    pdf = pd.read_parquet(tmp_path / "t")
    assert len(pdf) == len(df)
    np.testing.assert_allclose(df.ratio.to_numpy().reshape(5, -1), torch.stack([s for s, _ in seen])[:, 2].numpy(),
                               rtol=1e-6)
    # the files hold the norms; their float32 quotient is read_trace's ratio
    assert np.array_equal(np.sort((pdf.norm_m / pdf.norm_d).to_numpy()), np.sort(df.ratio.to_numpy()))


def test_lr_column_is_the_lr_each_step_used(tmp_path):
    model, opt = setup()
    sched = torch.optim.lr_scheduler.LambdaLR(opt.magnitude, lambda s: 1.0 / (s + 1))
    with Recorder(opt, tmp_path / "t") as rec:
        for x, y in models.batches("block", 4, dtype=torch.float32):
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    lrs = trace.read_trace(tmp_path / "t").groupby("step")["lr"].first().to_numpy()
    np.testing.assert_allclose(lrs, [1e-2 / (s + 1) for s in range(4)])


def test_every_k(tmp_path):
    model, opt = setup()
    with Recorder(opt, tmp_path / "t", every=3, flush_every=2) as rec:
        seen = train(model, opt, 10, rec)
    df = trace.read_trace(tmp_path / "t")
    assert sorted(df.step.unique()) == [0, 3, 6, 9]
    got = df[df.step == 6].ratio.to_numpy()
    np.testing.assert_array_equal(got, seen[6][0][2].numpy())
    assert df.groupby("step")["loss"].first().loc[9] == pytest.approx(float(seen[9][1]))
    assert trace.read_metadata(tmp_path / "t")["every"] == 3


def test_metadata(tmp_path):
    model, opt = setup()
    user = {"task": "block", "batch_size": 4, "seed": 7, "config": {"steps": 3}}
    with Recorder(opt, tmp_path / "t", model=model, metadata=user, flush_every=2) as rec:
        train(model, opt, 3, rec)
    meta = trace.read_metadata(tmp_path / "t")
    assert meta == json.loads((tmp_path / "t" / trace.SIDECAR).read_text())
    assert meta["format"] == trace.FORMAT and meta["granularity"] == "layer"
    assert meta["task"] == "block" and meta["batch_size"] == 4 and meta["seed"] == 7
    assert meta["config"] == {"steps": 3} and meta["every"] == 1 and meta["device"] == "cpu"
    assert meta["versions"] == {"graftlab": graftlab.__version__, "torch": torch.__version__}
    assert meta["magnitude"]["class"].endswith("Adam") and meta["direction"]["class"].endswith("SGD")
    assert meta["magnitude"]["hyperparameters"]["lr"] == 1e-2
    assert meta["direction"]["hyperparameters"]["momentum"] == 0.9
    groups = {g["name"]: g for g in meta["groups"]}
    assert list(groups) == [n for n, _ in model.named_parameters()]
    q = groups["query.weight"]
    assert (q["kind"], q["shape"], q["numel"], q["members"]) == ("Q", [8, 8], 64, ["query.weight"])
    assert groups["norm1.bias"]["kind"] == "norm" and groups["fc2.weight"]["ffn"] == "fc2"
    assert [groups[f"{n}.bias"]["kind"] for n in ("key", "value", "fc1")] == ["K", "V", "ffn"]


def test_global_and_custom_groups(tmp_path):
    model, opt = setup(granularity="global")
    with Recorder(opt, tmp_path / "g") as rec:
        train(model, opt, 2, rec)
    meta = trace.read_metadata(tmp_path / "g")
    (g,) = meta["groups"]
    assert g["name"] == "global" and g["kind"] == "other" and g["block"] is None and g["shape"] is None
    assert g["numel"] == sum(p.numel() for p in model.parameters()) and len(g["members"]) == 16

    model, _ = setup()
    opt = graftlab.Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1),
                         granularity=lambda n: n.split(".")[0], names=model)
    with Recorder(opt, tmp_path / "c", kinds={"out": "attn_out"}) as rec:
        train(model, opt, 2, rec)
    groups = {g["name"]: g for g in trace.read_metadata(tmp_path / "c")["groups"]}
    assert groups["query"]["kind"] == "Q" and groups["fc1"]["ffn"] == "fc1" and groups["out"]["kind"] == "attn_out"
    assert groups["query"]["members"] == ["query.weight", "query.bias"]


def test_refuses_existing_path_and_overwrites_only_traces(tmp_path):
    model, opt = setup()
    with Recorder(opt, tmp_path / "t") as rec:
        train(model, opt, 2, rec)
    with pytest.raises(GraftlabError, match="exists"):
        Recorder(opt, tmp_path / "t")
    assert len(trace.read_trace(tmp_path / "t")) == 2 * 16  # untouched
    with Recorder(opt, tmp_path / "t", overwrite=True, start_step=0) as rec:
        train(model, opt, 1, rec)
    assert len(trace.read_trace(tmp_path / "t")) == 16
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(GraftlabError, match="does not hold a graftlab trace"):
        Recorder(opt, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    f = tmp_path / "file.parquet"
    f.write_text("x")
    with pytest.raises(GraftlabError, match="exists"):
        Recorder(opt, f)


def test_close_twice_detaches_hook(tmp_path):
    model, opt = setup()
    rec = Recorder(opt, tmp_path / "t")
    train(model, opt, 2, rec)
    rec.close()
    rec.close()
    train(model, opt, 2)
    assert sorted(trace.read_trace(tmp_path / "t").step.unique()) == [0, 1]
    assert not opt._optimizer_step_post_hooks


def test_recorder_closed_before_any_step_leaves_no_trace(tmp_path):
    from graftlab.cli.app import run

    model, opt = setup()
    Recorder(opt, tmp_path / "x").close()
    assert not (tmp_path / "x").exists()  # the folder it created goes with it
    # a user's empty folder is kept, empty again
    (tmp_path / "mine").mkdir()
    Recorder(opt, tmp_path / "mine").close()
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    # the same path opens again without overwrite, and records
    with Recorder(opt, tmp_path / "x") as rec:
        train(model, opt, 2, rec)
    assert sorted(trace.read_trace(tmp_path / "x").step.unique()) == [0, 1]
    assert run(["info", str(tmp_path / "x"), "--no-groups"]) == 0
    # a resumed trace that gets no new step keeps its steps
    Recorder(opt, tmp_path / "x", resume=True).close()
    assert sorted(trace.read_trace(tmp_path / "x").step.unique()) == [0, 1]


def test_resume_continues_numbering(tmp_path):
    model, opt = setup()
    with Recorder(opt, tmp_path / "t", flush_every=4) as rec:
        train(model, opt, 6, rec)
    state = opt.state_dict()  # checkpoint at step 6
    with Recorder(opt, tmp_path / "t", flush_every=4, resume=True) as rec:
        train(model, opt, 3, rec, seed=2)  # steps 6..8
    df = trace.read_trace(tmp_path / "t")
    assert list(df.step.unique()) == list(range(9))
    # restart from an earlier checkpoint: the trace drops the steps that are redone
    model, opt2 = setup()
    opt2.load_state_dict(state)
    with Recorder(opt2, tmp_path / "t", flush_every=4, resume=True, start_step=5) as rec:
        train(model, opt2, 2, rec)
    df = trace.read_trace(tmp_path / "t")
    assert list(df.groupby("step").size().index) == list(range(7)) and (df.groupby("step").size() == 16).all()
    for part in (tmp_path / "t").glob("part-*"):  # rewritten parts keep the run metadata
        assert trace.read_metadata(part)["groups"] == df.attrs["graftlab"]["groups"]


def test_rejects_bad_arguments(tmp_path):
    model, opt = setup()
    with pytest.raises(GraftlabError):
        Recorder(opt.magnitude, tmp_path / "a")
    with pytest.raises(GraftlabError):
        Recorder(opt, tmp_path / "b", every=0)
    with Recorder(opt, tmp_path / "c") as rec:
        train(model, opt, 1)
        with pytest.raises(GraftlabError, match="trace column"):
            rec.log(ratio=1.0)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    import graftlab
    from graftlab.record.recorder import Recorder
    from tests import models
    torch.set_num_threads(1)
    model = models.make("block", dtype=torch.float32)
    opt = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-3),
                         torch.optim.SGD(model.parameters(), lr=0.1), names=model)
    rec = Recorder(opt, sys.argv[1], flush_every=5)
    x, y = models.batches("block", 1, dtype=torch.float32)[0]
    while True:
        loss = (model(x) - y).pow(2).mean(); loss.backward(); opt.step(); opt.zero_grad()
        rec.log(loss=loss.detach())
    """
)


def test_sigkill_leaves_readable_prefix(tmp_path):
    script = tmp_path / "rec.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT)))
    out = tmp_path / "t"
    with procs.started([sys.executable, script, out], cwd=ROOT) as proc:
        deadline = time.monotonic() + procs.timeout(120)
        while time.monotonic() < deadline and len(list(out.glob("part-*"))) < 4:
            time.sleep(0.02)
        assert proc.poll() is None, "recording process ended early"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=procs.timeout(30))
    df = trace.read_trace(out)
    per_step = df.groupby("step").size()
    n = len(per_step)
    assert n >= 20 and n % 5 == 0  # whole flushes only
    assert list(per_step.index) == list(range(n)) and (per_step == 16).all()
    assert np.isfinite(df[["norm_m", "norm_d", "loss"]].to_numpy()).all()
    assert len(pd.read_parquet(out)) == len(df)  # half-written parts stay invisible to pandas too


def _files(path: Path) -> list[tuple[str, bytes]]:
    return sorted((p.name, p.read_bytes()) for p in path.iterdir())


@pytest.mark.parametrize("extra,match", [
    (["--resume"], "--resume needs --checkpoint-dir"),  # it used to delete every part, then say so
    (["--overwrite", "--threads", "0"], "threads"),
    (["--overwrite", "--schedule", "nope"], "--schedule"),
    (["--overwrite", "--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint-dir"),
    (["--overwrite", "--granularity", "rows"], "granularity"),
    (["--overwrite", "--m-hparam", "momentum=0.9"], "no hyperparameter"),
    (["--overwrite", "--warmup", "10"], "warmup"),
    (["--overwrite", "--metrics", "{tmp}"], "is a folder"),
    (["--overwrite", "--checkpoint-dir", "{tmp}/t/_graftlab.json"], "is a file"),
    (["--task", "nope"], "--task"),
])
def test_record_config_errors_leave_the_trace_alone(tmp_path, extra, match):
    """Every config mistake is found before the trace (or anything else) is touched."""
    from typer.testing import CliRunner

    from graftlab.cli.app import app

    model, opt = setup()
    out = tmp_path / "t"
    with Recorder(opt, out, flush_every=2) as rec:
        train(model, opt, 4, rec)
    before = _files(out)
    args = ["record", "--steps", "4", "--out", str(out), "--device", "cpu", "--quiet",
            *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, GraftlabError), res.output
    assert re.search(match, str(res.exception)), str(res.exception)
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_record_library_refuses_a_resume_without_checkpoints(tmp_path):
    from graftlab.runs import RecordConfig
    from graftlab.runs import record

    model, opt = setup()
    with Recorder(opt, tmp_path / "t", flush_every=2) as rec:
        train(model, opt, 4, rec)
    before = _files(tmp_path / "t")
    with pytest.raises(GraftlabError, match="resume=True needs checkpoint_dir"):
        record(RecordConfig(steps=4, out=str(tmp_path / "t"), resume=True), progress=False)
    with pytest.raises(GraftlabError, match="already exists; pass overwrite=True"):
        record(RecordConfig(steps=4, out=str(tmp_path / "t")), progress=False)
    with pytest.raises(GraftlabError, match="out is required"):
        record(RecordConfig(steps=4), progress=False)
    assert _files(tmp_path / "t") == before


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graftlab.cli.app", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=600)


@pytest.mark.slow
def test_record_cli_bert_end_to_end(tmp_path):
    out = tmp_path / "t"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("batch_size: 8\neval_every: 0\neval_size: 8\nd_hparams: {momentum: 0.9}\n")
    res = run_cli("record", "--task", "bert", "--magnitude", "adam", "--direction", "sgd", "--granularity", "layer",
                  "--steps", "30", "--out", str(out), "--config", str(cfg), "--direction-lr", "0.5",
                  "--flush-every", "8", "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr
    assert f"trace written to {out}" in " ".join(res.stdout.split())
    assert "Q (self-attention Q)" in res.stdout
    df = trace.read_trace(out)
    meta = df.attrs["graftlab"]
    from graftlab.tasks.bert import BertConfig, BertMLM

    # same parameter names as the task's model, in named_parameters() order
    model = BertMLM(BertConfig(vocab_size=meta["task_info"]["vocab_size"]))
    names = [n for n, _ in model.named_parameters()]
    assert [g["name"] for g in meta["groups"]] == names
    assert sorted(df.step.unique()) == list(range(30)) and len(df) == 30 * len(names)
    w = df[df.group.str.endswith(".weight")]
    assert np.isfinite(w.ratio).all() and (w.ratio > 0).all()
    assert meta["batch_size"] == 8 and meta["direction"]["hyperparameters"]["momentum"] == 0.9
    assert meta["direction"]["hyperparameters"]["lr"] == 0.5 and meta["config"]["flush_every"] == 8
    assert np.isfinite(df.loss).all() and (df.lr > 0).all()

    info = run_cli("info", str(out))
    assert info.returncode == 0 and "0 .. 29 (30 recorded)" in info.stdout and "blocks.0.attn.query.weight" in info.stdout

    again = run_cli("record", "--task", "bert", "--steps", "2", "--out", str(out))
    assert again.returncode == 2 and again.stderr.strip().startswith("error:") and "overwrite" in again.stderr
    assert len(trace.read_trace(out)) == len(df)


def test_info_bad_path(tmp_path):
    res = run_cli("info", str(tmp_path / "nothing"))
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path / 'nothing'}: no such trace"
    (tmp_path / "x.parquet").write_text("junk")
    res = run_cli("info", str(tmp_path / "x.parquet"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pinned_flush_matches_last_stats(tmp_path):
    model = models.make("block", dtype=torch.float32).cuda()
    opt = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2),
                         torch.optim.SGD(model.parameters(), lr=0.1), names=model)
    seen = []
    with Recorder(opt, tmp_path / "t", flush_every=3, model=model) as rec:
        for x, y in models.batches("block", 7, dtype=torch.float32):
            loss = (model(x.cuda()) - y.cuda()).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss.detach())
            seen.append((opt.last_stats.cpu(), loss.item()))
    df = trace.read_trace(tmp_path / "t")
    np.testing.assert_array_equal(df.ratio.to_numpy().reshape(7, -1), torch.stack([s for s, _ in seen])[:, 2].numpy())
    np.testing.assert_allclose(df.groupby("step")["loss"].first().to_numpy(), [l for _, l in seen], rtol=1e-6)
    assert trace.read_metadata(tmp_path / "t")["device"].startswith("cuda")


def test_kind_summary_keeps_degenerate_groups_out():
    from graftlab.distill.analysis import kind_summary

    groups = [("q0", "Q"), ("q1", "Q"), ("a.key.bias", "K"), ("a.key.weight", "K"), ("v", "V"), ("n", "norm")]
    meta = {"groups": [{"name": g, "kind": k} for g, k in groups]}
    ratios = {"q0": [1.0, 3.0, 2.0], "q1": [4.0, 4.0, np.inf], "a.key.bias": [1e5, 2e5, 3e5],
              "a.key.weight": [2.0, 2.0, 2.0], "v": [0.5, 0.5, 0.5], "n": [np.nan, np.nan, np.nan]}
    df = pd.DataFrame([(s, g, r) for g, rs in ratios.items() for s, r in enumerate(rs)],
                      columns=["step", "group", "ratio"])
    for frame in (df, df.assign(norm_g=np.where(df.group == "a.key.bias", 1e-12, 0.5))):
        # without norm_g: the key bias far above its weight; with it: a gradient at float-noise level
        out = kind_summary(frame, meta)
        assert list(out.index) == ["Q", "K", "V", "norm"]
        assert out.loc["Q", "median"] == 3.0 and out.loc["Q", "min"] == 2.0 and out.loc["Q", "max"] == 4.0
        assert out.loc["K", "median"] == 2.0 and out.loc["K", "flagged"] == 1 and out.loc["K", "groups"] == 2
        assert np.isnan(out.loc["norm", "median"]) and out.loc["norm", "flagged"] == 1
        assert out.attrs["flagged"] == {"a.key.bias": "degenerate", "n": "no finite ratio"}
    # a large ratio with a real gradient is kept
    out = kind_summary(df.assign(norm_g=0.5), meta)
    assert out.attrs["flagged"] == {"n": "no finite ratio"} and out.loc["K", "median"] == pytest.approx(100001.0)


def test_info_on_a_live_trace_without_parts_names_its_writer(tmp_path, capsys):
    from graftlab.cli.app import run

    model, opt = setup()
    with Recorder(opt, tmp_path / "t", flush_every=50):
        capsys.readouterr()
        assert run(["info", str(tmp_path / "t")]) == 2
        err = capsys.readouterr().err
        assert f"being written by pid {os.getpid()}, which has not completed a part file yet" in err, err
