"""Grafting under torch.distributed (2 ranks, gloo, CPU) against one-process references.

Set ``GRAFTLAB_DIST_DEVICE=cuda`` on a machine with two GPUs to run the same checks over NCCL.

One ``torchrun --standalone --nproc-per-node 2 tests/dist_worker.py`` run (module fixture) trains a
float64 MLP under DDP and under FSDP2 ``fully_shard`` with several M#D pairs, partitions and both
paths; every test compares its results with the same run in this process on the full global batch.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import graftlab
from graftlab import distributed as gd
from graftlab.errors import GraftlabError
from tests import dist_worker as w
from tests import procs

ROOT = Path(__file__).resolve().parents[2]
FSDP_SCENARIOS = ("direct_layer", "generic_layer", "direct_custom", "generic_global", "direct_coordinate")
TOL = dict(rtol=1e-12, atol=1e-14)  # float64 runs: only the summation order differs


@pytest.fixture(scope="module")
def dist_out(tmp_path_factory) -> Path:
    if not torch.distributed.is_available():
        pytest.skip("this PyTorch build has no torch.distributed")
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if env.get("GRAFTLAB_DIST_DEVICE", "cpu") == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("GRAFTLAB_DIST_DEVICE=cuda needs two GPUs")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "dist_worker.py"), str(out)]
    procs.run(cmd, seconds=600, cwd=ROOT, env=env)  # ~60 s alone
    return out


def _load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=False)


def _assert_same_run(got: dict, ref: dict) -> None:
    assert tuple(got["groups"]) == tuple(ref["groups"])
    assert got["stats"].shape == ref["stats"].shape == (w.STEPS, 3, len(ref["groups"]))
    assert torch.isfinite(ref["stats"]).all()
    torch.testing.assert_close(got["stats"], ref["stats"], **TOL)
    assert got["weights"].keys() == ref["weights"].keys()
    for name in ref["weights"]:
        torch.testing.assert_close(got["weights"][name], ref["weights"][name], **TOL, msg=name)


def test_ddp_stats_on_rank0_equal_single_process(dist_out):
    got = _load(dist_out, "ddp-direct_layer")
    _assert_same_run(got, w.run_single("direct_layer"))
    # only rank 0 got a real consumer; the other rank a no-op stand-in
    assert got["consumer_type"] == "list"
    assert (dist_out / "rank1-ddp-direct_layer.txt").read_text() == "_Nothing"
    # replicated parameters: grafting adds no collective to the step
    assert got["comm"]["step"] == ({}, {})
    assert got["expected_step_comm"]["collectives"] == 0


@pytest.mark.parametrize("scenario", FSDP_SCENARIOS)
def test_fsdp_ratios_and_weights_equal_single_process(dist_out, scenario):
    got = _load(dist_out, f"fsdp-{scenario}")
    _assert_same_run(got, w.run_single(scenario))
    assert (dist_out / f"rank1-fsdp-{scenario}.txt").read_text() == "_Nothing"


@pytest.mark.parametrize("scenario", FSDP_SCENARIOS)
def test_fsdp_step_is_one_all_reduce_of_two_rows_per_group(dist_out, scenario):
    got = _load(dist_out, f"fsdp-{scenario}")
    calls, nbytes = got["comm"]["step"]
    n_groups = len(got["groups"])
    assert calls == {"allreduce_": 1}, calls  # no per-parameter collective, no FSDP collective
    assert nbytes == {"allreduce_": 2 * n_groups * 8}  # float64 here; float32 for float32 models
    assert got["expected_step_comm"] == {
        "collectives": 1, "op": "all_reduce", "numel": 2 * n_groups, "bytes": 2 * n_groups * 8,
        "dtype": "torch.float64",
    }


def test_fsdp_checkpoint_resumes_on_one_process(dist_out):
    """Saved by 2 sharded ranks after CKPT_AT steps, resumed by one plain process: same end state."""
    ckpt = dist_out / "ckpt-fsdp"
    meta = json.loads((ckpt / gd.CHECKPOINT_META).read_text())
    assert meta["world_size"] == 2 and meta["extra"] == {"step": w.CKPT_AT}
    model = w.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = w.make_graft(model, "direct_layer")
    loaded = gd.load_checkpoint(ckpt, model, opt)
    assert opt.steps == w.CKPT_AT == loaded["graft"]["steps"]
    resumed = w.run_single("direct_layer", model=model, opt=opt, start=w.CKPT_AT)
    got = _load(dist_out, "fsdp-direct_layer")
    torch.testing.assert_close(resumed["stats"], got["stats"][w.CKPT_AT:], **TOL)
    for name, value in got["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, **TOL, msg=name)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_rank0_trace_equals_single_process_trace(dist_out, tmp_path, mode):
    from graftlab.record.recorder import Recorder
    from graftlab.trace import read_trace

    model = w.build_model()
    opt = w.make_graft(model, "direct_layer")
    with Recorder(opt, tmp_path / "ref", model=model, flush_every=2):
        w.run_single("direct_layer", model=model, opt=opt)
    ref, got = read_trace(tmp_path / "ref"), read_trace(dist_out / f"trace-{mode}")
    assert len(got) == w.STEPS * len(opt.group_names)
    assert got["step"].tolist() == ref["step"].tolist()
    assert got["group"].astype(str).tolist() == ref["group"].astype(str).tolist()
    for col in ("norm_m", "norm_d", "ratio"):  # float32 columns of float64 runs
        np.testing.assert_allclose(got[col].to_numpy(), ref[col].to_numpy(), rtol=1e-6, err_msg=col)


# -- one-process behaviour of the helpers ---------------------------------------------------------
def test_one_process_env_and_helpers(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    env = gd.init_from_env(device="cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    model = w.build_model()
    assert gd.wrap_model(model, env, mode="fsdp") is model
    x = torch.arange(6.0)
    assert gd.local_rows((x, {"y": x}), env)[0] is x
    assert gd.main_only(list) == []
    with pytest.raises(GraftlabError, match="parallel mode"):
        gd.wrap_model(model, env, mode="zero3")
    opt = w.make_graft(model, "direct_layer")
    assert gd.step_communication(opt)["collectives"] == 0
    assert opt._layout is None  # plain tensors keep the plain path


def test_one_process_runtime(monkeypatch, tmp_path):
    """What a run asks of the Runtime, answered for one process: no wrapping, rank 0 writes."""
    from types import SimpleNamespace

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    rt = gd.Runtime.start("cpu")
    assert (rt.device, rt.writes, rt.env.distributed) == (torch.device("cpu"), True, False)
    model = w.build_model()
    task = SimpleNamespace(model=model, batch_size=3, train_batches=lambda: iter([1]))
    assert rt.wrap_task(task, "fsdp") is model and task.model is model
    x = torch.arange(3.0)
    assert rt.mean(x) is x
    assert rt.main_only(list, [1]) == [1]
    opt = w.make_graft(model, "direct_layer")
    plain = SimpleNamespace(checkpoint_dir=None, checkpoint_every=0, resume=False, steps=4)
    assert rt.checkpoints(plain, model, opt) == (None, 0) and rt.resume_step(plain) == 0
    cfg = SimpleNamespace(checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=2, resume=True, steps=4)
    ckpt, first = rt.checkpoints(cfg, model, opt)
    assert first == 0 and ckpt.every == 2  # nothing saved yet: a resumed run starts at 0
    ckpt.save(2)
    assert rt.resume_step(cfg) == 2 and rt.checkpoints(cfg, model, opt)[1] == 2
    with pytest.raises(GraftlabError, match="unknown device"):
        gd.Runtime.start("tpu")


def test_local_rows_splits_the_global_batch():
    env = gd.DistEnv(rank=1, world_size=2, backend="gloo")
    x = torch.arange(8).reshape(4, 2)
    torch.testing.assert_close(gd.local_rows({"x": x}, env)["x"], x[2:])
    with pytest.raises(GraftlabError, match="not divisible"):
        gd.local_rows(torch.zeros(3, 2), env)


def test_checkpoint_round_trip_one_process_and_refusals(tmp_path):
    model = w.build_model()
    opt = w.make_graft(model, "direct_layer")
    env = gd.DistEnv()
    for t in range(2):
        w.train_step(model, opt, t, env)
    path = gd.save_checkpoint(tmp_path / "ck", model, opt, extra={"step": 2})
    with pytest.raises(GraftlabError, match="exists"):
        gd.save_checkpoint(path, model, opt)
    ref = w.run_single("direct_layer", model=model, opt=opt, start=2)

    fresh = w.build_model()
    fresh_opt = w.make_graft(fresh, "direct_layer")
    assert gd.load_checkpoint(path, fresh, fresh_opt)["extra"] == {"step": 2}
    again = w.run_single("direct_layer", model=fresh, opt=fresh_opt, start=2)
    torch.testing.assert_close(again["stats"], ref["stats"], rtol=0, atol=0)

    other = w.make_graft(w.build_model(), "generic_global")
    with pytest.raises(GraftlabError, match="different grafting partition"):
        gd.load_checkpoint(path, w.build_model(), other)
    plain = torch.optim.SGD(w.build_model().parameters(), lr=0.1)
    with pytest.raises(GraftlabError, match="optimizer parts"):
        gd.load_checkpoint(path, w.build_model(), plain)
    with pytest.raises(GraftlabError, match="not a complete graftlab checkpoint"):
        gd.load_checkpoint(tmp_path, model, opt)


def test_plain_optimizer_checkpoint(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    gd.save_checkpoint(tmp_path / "ck", model, opt)
    fresh = nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    gd.load_checkpoint(tmp_path / "ck", fresh, fresh_opt)
    torch.testing.assert_close(fresh.weight, model.weight)
    torch.testing.assert_close(fresh_opt.state[fresh.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


def test_checkpoints_resume_continues_identically(tmp_path):
    """Periodic checkpoints with an lr schedule on M: a resumed run matches an uninterrupted one."""

    def run(steps, ckdir=None, resume=False):
        model = w.build_model()
        opt = w.make_graft(model, "direct_layer")
        sched = torch.optim.lr_scheduler.LambdaLR(opt.magnitude, lambda k: 1.0 / (1 + k))
        ck = gd.Checkpoints(ckdir, model, opt, sched, every=2, keep=2) if ckdir else None
        start = ck.resume() if resume else 0
        stats = []
        for t in range(start, steps):
            w.train_step(model, opt, t, gd.DistEnv())
            sched.step()
            stats.append(opt.last_stats.clone())
            if ck:
                ck.maybe_save(t + 1)
        return start, torch.stack(stats), w.full_weights(model), opt.magnitude.param_groups[0]["lr"]

    _, full_stats, full_w, full_lr = run(6)
    run(5, tmp_path / "ck")  # checkpoints after steps 2 and 4; the run "dies" after step 5
    assert [p.name for p in gd.Checkpoints(tmp_path / "ck", None, None).all()] == ["step-00000002", "step-00000004"]
    start, stats, weights, lr = run(6, tmp_path / "ck", resume=True)
    assert start == 4
    torch.testing.assert_close(stats, full_stats[4:], rtol=0, atol=0)
    assert lr == full_lr
    for name in full_w:
        torch.testing.assert_close(weights[name], full_w[name], rtol=0, atol=0)
    assert gd.Checkpoints(tmp_path / "none", None, None).resume() == 0


@pytest.mark.slow
def test_graftlab_record_under_torchrun_fsdp_equals_one_process(tmp_path):
    """`torchrun -m graftlab record --fsdp` on the bert task: rank 0's trace is the one-process trace.

    Three steps is already the smallest useful size: the time (about a minute) is three processes
    importing torch and building the task.
    """
    from graftlab.runs import RecordConfig
    from graftlab.runs import record
    from graftlab.trace import read_trace

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("eval_size: 4\nlog_every: 1\n")
    args = ["record", "--task", "bert", "--steps", "3", "--batch-size", "4", "--eval-every", "0", "--device", "cpu",
            "--config", str(cfg), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "graftlab",
           *args, "--fsdp", "--out", str(tmp_path / "dist")]
    proc = procs.run(cmd, seconds=600, cwd=ROOT, env=env)  # 36 s alone
    assert proc.stdout.count("trace written to") == 1  # rank 0 reports
    record(RecordConfig(task="bert", steps=3, batch_size=4, eval_every=0, eval_size=4, log_every=1, device="cpu",
                        out=str(tmp_path / "one")), progress=False)
    one, dist = read_trace(tmp_path / "one"), read_trace(tmp_path / "dist")
    assert one["step"].tolist() == dist["step"].tolist()
    assert one["group"].astype(str).tolist() == dist["group"].astype(str).tolist()
    # attention key biases have a zero true gradient: their D step is float noise (docs/distributed.md)
    keep = ~one["group"].astype(str).str.endswith("key.bias").to_numpy()
    for col in ("norm_m", "norm_d", "ratio"):  # float32 runs, different summation order
        np.testing.assert_allclose(dist[col].to_numpy()[keep], one[col].to_numpy()[keep], rtol=2e-4, err_msg=col)
    np.testing.assert_allclose(dist["loss"].to_numpy(), one["loss"].to_numpy(), rtol=1e-5)


def test_record_resumes_from_checkpoint(tmp_path):
    """`record` with --checkpoint-dir, stopped after 2 of 4 steps, then --resume: the trace and the
    end state equal an uninterrupted 4-step run (constant lr, so the 2-step run is its prefix)."""
    from dataclasses import replace

    from graftlab.runs import RecordConfig
    from graftlab.runs import record
    from graftlab.trace import read_trace

    torch.set_num_threads(1)
    base = RecordConfig(task="bert", steps=4, batch_size=4, eval_every=0, eval_size=4, log_every=1, device="cpu",
                        schedule="constant", warmup=0.0)
    full = record(replace(base, out=str(tmp_path / "full")), progress=False)
    ck = str(tmp_path / "ck")
    record(replace(base, steps=2, out=str(tmp_path / "part"), checkpoint_dir=ck), progress=False)
    assert [p.name for p in gd.Checkpoints(ck, None, None).all()] == ["step-00000002"]
    resumed = record(replace(base, out=str(tmp_path / "part"), checkpoint_dir=ck, resume=True), progress=False)
    assert resumed.fit.metrics["step"].tolist() == [2, 3]
    a, b = read_trace(tmp_path / "full"), read_trace(tmp_path / "part")
    assert b["step"].tolist() == a["step"].tolist()
    for col in ("norm_m", "norm_d", "ratio", "loss", "lr"):
        np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), rtol=1e-6, err_msg=col)
    assert resumed.fit.final == pytest.approx(full.fit.final, rel=1e-6)
    with pytest.raises(GraftlabError, match="resume=True needs checkpoint_dir"):
        record(replace(base, out=str(tmp_path / "x"), resume=True), progress=False)


def test_a_new_run_keeps_its_own_checkpoints_beside_an_older_runs(tmp_path):
    """Two recorded runs share a checkpoint_dir: retention (keep=2) counts each run's own
    checkpoints only, the older run's are never deleted or overwritten (its step 4 shares a step
    with the new run's), and --resume continues the run that saved last, from its own newest."""
    from dataclasses import replace

    from graftlab.runs import RecordConfig
    from graftlab.runs import record
    from graftlab.trace import read_trace

    torch.set_num_threads(1)
    ck = tmp_path / "ck"
    base = RecordConfig(task="bert", batch_size=4, eval_every=0, eval_size=4, log_every=1, device="cpu",
                        schedule="constant", warmup=0.0, checkpoint_dir=str(ck), checkpoint_every=2)
    record(replace(base, steps=6, seed=1, out=str(tmp_path / "older")), progress=False)
    older = {p.name: (p / gd.CHECKPOINT_META).read_text() for p in ck.iterdir()}
    assert sorted(older) == ["step-00000004", "step-00000006"]

    record(replace(base, steps=5, out=str(tmp_path / "new")), progress=False)  # saves after 2, 4, 5
    for name, meta in older.items():  # the older run's checkpoints are untouched
        assert (ck / name / gd.CHECKPOINT_META).read_text() == meta
    mine = gd.Checkpoints(ck, None, None).all()  # the run that saved last: the new one
    runs = {json.loads((p / gd.CHECKPOINT_META).read_text())["extra"]["run"] for p in mine}
    older_run = json.loads(older["step-00000004"])["extra"]["run"]
    assert [gd.checkpoint_step(p) for p in mine] == [4, 5] and len(runs) == 1 and older_run not in runs
    assert len(list(ck.iterdir())) == 4  # two of each run's

    resumed = record(replace(base, steps=6, out=str(tmp_path / "new"), resume=True), progress=False)
    assert resumed.fit.metrics["step"].tolist() == [5]  # from the new run's step 5, not the older run's 6
    assert read_trace(tmp_path / "new")["step"].unique().tolist() == list(range(6))
    for name, meta in older.items():
        assert (ck / name / gd.CHECKPOINT_META).read_text() == meta
    assert [gd.checkpoint_step(p) for p in gd.Checkpoints(ck, None, None).all()] == [5, 6]
