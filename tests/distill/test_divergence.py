"""Divergence: the per-step non-finite check, stop and restart (LHOPT's restart action), the marks in
metrics and traces, and distill's refusal of windows that follow a divergence."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graftlab import Graft, trace
from graftlab.runs import RecordConfig, TrainConfig
from graftlab.distill.pipeline import distill
from graftlab.distill.divergence import RESTART_COLUMN, Marks, find
from graftlab.errors import DivergedError, GraftlabError
from graftlab.graft.optimizers import make_optimizer
from graftlab.runs import fit, read_metrics, record, train
from graftlab.runs.divergence import NonFiniteWatch
from graftlab.tasks import get_task
from tests.runs.test_train import ToyTask
from tests.trace_builder import metadata

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
BERT = dict(task="bert", batch_size=8, eval_size=16, eval_every=0, device="cpu", schedule="constant", warmup=0)


def _reference(lr: float, steps: int) -> dict:
    """The same bert run as ``train(TrainConfig(**BERT, optimizer="sgd", lr=lr))`` without any check:
    per step the loss and the parameter tensors whose gradient is not finite."""
    task = get_task("bert", size="tiny", data=None, batch_size=8, seed=0, device=torch.device("cpu"), eval_size=16)
    torch.manual_seed(0)
    opt = torch.optim.SGD(task.model.parameters(), lr=lr)
    batches, losses, bad = task.train_batches(), [], []
    for _ in range(steps):
        loss = task.loss(task.model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.item())
        bad.append([n for n, p in task.model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()])
        opt.step()
    return {"losses": np.array(losses), "bad": bad}


def test_sgd_lr_100_stops_at_the_first_non_finite_step_and_names_it(tmp_path):
    out = tmp_path / "m.parquet"
    result = train(TrainConfig(**BERT, optimizer="sgd", lr=100.0, steps=30, metrics=str(out)), progress=False)
    ref = _reference(100.0, 30)
    first_loss = int(np.flatnonzero(~np.isfinite(ref["losses"]))[0])
    first_bad = min(first_loss, next(i for i, b in enumerate(ref["bad"]) if b))
    # on CPU the flag is read the same step: the run stops on the first bad step, before the first
    # non-finite loss or on it
    assert result.diverged_at == first_bad and result.steps == first_bad + 1 <= first_loss + 1
    div = result.divergence
    assert div.step == div.detected == first_bad and div.what == "gradient norms"
    assert sorted(div.first_groups()) == sorted(ref["bad"][first_bad]) and div.first_groups()
    assert div.total == sum(1 for _ in get_task("bert", size="tiny", data=None, batch_size=8, seed=0,
                                                device=torch.device("cpu"), eval_size=16).model.parameters())
    np.testing.assert_allclose(result.metrics["loss"].to_numpy(), ref["losses"][: first_bad + 1], rtol=1e-5)
    with pytest.raises(DivergedError, match=f"training diverged at step {first_bad}: gradient norms not finite in "):
        result.raise_if_diverged()
    frame, meta = read_metrics(out)  # written, with what stopped the run
    assert len(frame) == first_bad + 1 and RESTART_COLUMN not in frame.columns
    assert meta["diverged_at"] == first_bad and meta["divergence"]["stopped"]["step"] == first_bad


def test_restart_from_the_start_equals_a_run_with_the_scaled_lr_from_the_start():
    # every restart point is the start (the next would be at step 100): after the restart the run is
    # the one with lr x factor, step for step (state, data order and RNG restored exactly)
    cfg = dict(BERT, optimizer="sgd", steps=24)
    restarted = train(TrainConfig(**cfg, lr=3.0, on_divergence="restart", divergence_lr_factor=0.1), progress=False)
    plain = train(TrainConfig(**cfg, lr=0.3), progress=False)
    assert restarted.diverged_at is None and restarted.divergence is None and math.isfinite(restarted.final["loss"])
    (event,) = restarted.restarts
    assert event.count == 1 and event.from_step == 0 and event.lr_scale == pytest.approx(0.1)
    assert event.source == "memory" and event.divergence.step > 0
    m = restarted.metrics
    assert m["step"].tolist() == list(range(24)) and (m[RESTART_COLUMN] == 1).all()
    np.testing.assert_allclose(m["lr"].to_numpy(), 0.3)
    np.testing.assert_allclose(m["loss"].to_numpy(), plain.metrics["loss"].to_numpy(), rtol=1e-6)
    assert restarted.final == pytest.approx(plain.final)


def test_restart_marks_in_the_trace_and_metrics_and_distill_refuses_them(tmp_path):
    out, metrics = tmp_path / "t", tmp_path / "m.parquet"
    cfg = RecordConfig(**BERT, magnitude="sgd", direction="sgd", magnitude_lr=30.0, direction_lr=0.1, steps=16,
                       out=str(out), metrics=str(metrics), flush_every=4, on_divergence="restart",
                       divergence_lr_factor=0.01, checkpoint_every=8)
    res = record(cfg, progress=False)
    fit_ = res.fit
    assert fit_.diverged_at is None and fit_.restarts and math.isfinite(fit_.final["loss"])
    df = trace.read_trace(out)
    groups = res.groups
    assert len(df) == 16 * groups and df["step"].is_monotonic_increasing  # every step once
    assert df.groupby("step").size().eq(groups).all()
    last = fit_.restarts[-1]
    by_step = df.groupby("step")[RESTART_COLUMN].first()
    assert (by_step[by_step.index < fit_.restarts[0].from_step] == 0).all()
    assert (by_step[by_step.index >= last.from_step] == last.count).all()
    assert np.isfinite(df[["norm_m", "norm_d"]].to_numpy()).all()  # the diverged attempt's rows are gone
    frame, meta = read_metrics(metrics)
    assert frame[RESTART_COLUMN].tolist() == by_step.astype(int).tolist()
    assert [r["from_step"] for r in meta["divergence"]["restarts"]] == [r.from_step for r in fit_.restarts]
    # the lr the trace and the metrics show after the restart is the scaled one
    np.testing.assert_allclose(df.groupby("step")["lr"].first().to_numpy(), frame["lr"].to_numpy())
    assert frame["lr"].iloc[-1] == pytest.approx(30.0 * last.lr_scale)

    with pytest.raises(GraftlabError, match=r"window of steps 0\.\.7 holds steps from a divergence on "
                                            r"\(restart marks from step 0: the run restarted"):
        distill(out, window=8)
    corr = distill(out, window=8, allow_divergence=True)
    assert corr.source["divergence"]["restart_step"] == fit_.restarts[0].from_step


def test_record_stops_and_distill_refuses_the_diverged_trace(tmp_path):
    out = tmp_path / "t"
    res = record(RecordConfig(**BERT, magnitude="sgd", direction="sgd", magnitude_lr=30.0, direction_lr=0.1,
                              steps=16, out=str(out), flush_every=4), progress=False)
    stop = res.fit.divergence
    assert stop is not None and stop.what == "step norms" and res.fit.steps == stop.step + 1
    df = trace.read_trace(out)
    assert df["step"].max() == stop.step and RESTART_COLUMN not in df.columns  # the steps run, no more
    marks = find(df)
    assert marks.nonfinite_step == stop.step and set(marks.groups) == set(stop.first_groups())
    with pytest.raises(GraftlabError, match=rf"window of steps 0\.\.{stop.step} holds steps from a divergence on \(step norms "
                                            rf"not finite from step {stop.step}"):
        distill(out, window=stop.step + 1)
    assert distill(out, window=stop.step).multipliers  # the steps before it distill


def test_max_restarts_used_up_stops_with_the_count_in_the_message():
    result = train(TrainConfig(**BERT, optimizer="sgd", lr=100.0, steps=20, on_divergence="restart",
                               divergence_lr_factor=0.9, max_restarts=2), progress=False)
    assert len(result.restarts) == 2 and result.diverged_at is not None
    assert result.metrics[RESTART_COLUMN].iloc[-1] == 2
    with pytest.raises(DivergedError, match=r"after 2 restarts, lr x0\.81\)"):
        result.raise_if_diverged()


# --- restarts from checkpoints, and resuming after a restart (the toy task: fast) --------------------

class Shift(ToyTask):
    """The toy regression whose inputs grow 5x from step 12 on: lr 0.5 diverges near step 27, lr 0.05
    does not (what a restart with a smaller lr can survive)."""

    def train_batches(self):
        for i, (x, y) in enumerate(super().train_batches()):
            yield (x * 5, y * 5) if i >= 12 else (x, y)


def _shift_fit(**cfg):
    task = Shift()
    config = TrainConfig(**{"steps": 40, "eval_every": 0, "optimizer": "sgd", "lr": 0.5, "schedule": "constant",
                            "warmup": 0, "on_divergence": "restart", **cfg})
    opt = make_optimizer("sgd", task.model.parameters(), 0.5)
    return fit(config, task, opt, schedule_owner=opt, progress=False), config, task, opt


def test_restarts_from_checkpoints_go_back_further_when_the_newest_fails_and_resume_keeps_the_lr(tmp_path):
    ckpt, seen = tmp_path / "ckpt", []
    task = Shift()
    config = TrainConfig(steps=40, eval_every=0, optimizer="sgd", lr=0.5, schedule="constant", warmup=0,
                         on_divergence="restart", divergence_lr_factor=0.1, checkpoint_dir=str(ckpt), checkpoint_every=5)
    opt = make_optimizer("sgd", task.model.parameters(), 0.5)
    result = fit(config, task, opt, schedule_owner=opt, progress=False,
                 on_restart=lambda r: seen.append(sorted(p.name for p in ckpt.iterdir())))
    assert result.diverged_at is None and math.isfinite(result.final["loss"])
    # the newest checkpoint before the divergence at 26 (step 25) is finite but too far gone: the run
    # diverges again from it at 28, before a new checkpoint, so the next restart takes the one before
    assert [(r.from_step, r.divergence.step) for r in result.restarts] == [(25, 26), (20, 28)]
    assert result.restarts[1].source.endswith("step-00000020")
    assert seen == [["step-00000020", "step-00000025"], ["step-00000020"]]  # the abandoned step 25 is gone
    assert result.lr_scale == pytest.approx(0.01) and result.metrics["lr"].iloc[-1] == pytest.approx(0.005)
    assert result.metrics[RESTART_COLUMN].tolist() == [0] * 20 + [2] * 20
    saved = json.loads((ckpt / "step-00000040" / "graftlab.json").read_text())["extra"]
    assert saved["divergence"] == {"restarts": 2, "lr_scale": pytest.approx(0.01)}

    # a resumed run keeps the scaled lr and the restart count
    more = fit(TrainConfig(**{**config.__dict__, "steps": 45, "resume": True}), task, opt, schedule_owner=opt,
               progress=False)
    assert more.metrics["step"].tolist() == list(range(40, 45)) and more.lr_scale == pytest.approx(0.01)
    assert more.metrics["lr"].to_numpy() == pytest.approx(0.005)
    assert (more.metrics[RESTART_COLUMN] == 2).all()


def test_in_memory_restart_points_are_the_start_and_the_newest():
    result = _shift_fit(checkpoint_every=5, divergence_lr_factor=0.1)[0]
    assert [(r.from_step, r.divergence.step) for r in result.restarts] == [(25, 26), (0, 28)]
    assert all(r.source == "memory" for r in result.restarts) and result.diverged_at is None
    assert result.metrics[RESTART_COLUMN].tolist() == [2] * 40


# --- the check itself --------------------------------------------------------------------------------

def test_watch_names_the_groups_and_their_first_steps():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = NonFiniteWatch(opt, model, torch.device("cpu"))
    assert watch.names == ["0.weight", "0.bias", "1.weight", "1.bias"] and watch.what == "gradient norms"
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        model(torch.ones(2, 3)).sum().backward()
        if step >= 3:
            model[0].bias.grad[1] = math.inf
        if step == 4:
            model[1].bias.grad = None  # a tensor without a gradient this step is not a bad one
            model[1].weight.grad[0, 0] = math.nan
        watch.observe(step, torch.tensor(1.0 if step < 5 else math.nan))
        found = watch.poll()
        if step < 3:
            assert found is None
    assert (found.step, found.detected, found.loss_step) == (3, 5, 5)
    assert found.groups == {"0.bias": 3, "1.weight": 4}
    assert found.message() == ("training diverged at step 3: gradient norms not finite in 1 of 4 groups (0.bias), "
                               "loss not finite from step 5, 1 more group by step 5")
    watch.reset()
    assert watch.poll() is None


class _SlowEvent:
    """A CUDA event stand-in whose copy is not done until someone waits for it."""

    waits = 0

    def record(self):
        self.done = False

    def query(self):
        return self.done

    def synchronize(self):
        _SlowEvent.waits += 1
        self.done = True


def test_lagged_flags_are_read_one_step_late_waiting_only_for_the_step_behind():
    # the logic the CUDA path runs (pinned copies and events), with copies that stay "in flight"
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = NonFiniteWatch(opt, model, torch.device("cpu"), lagged=True)
    watch._events = [_SlowEvent(), _SlowEvent()]
    _SlowEvent.waits = 0
    found = []
    for step in range(4):
        opt.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        watch.observe(step, torch.tensor(math.nan if step == 1 else 1.0))
        found.append(watch.poll())
        if found[-1] is not None:
            break
    # step 1's flag is read after step 2 was queued: the host waited once per step for the step behind
    assert found[:2] == [None, None] and found[2].step == found[2].detected == 1 and found[2].loss_step == 1
    assert _SlowEvent.waits == 2
    watch.reset()
    watch.observe(7, torch.tensor(math.inf))
    assert watch.poll() is None and watch.poll(wait=True).step == 7  # wait: the end of a run, a save


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grafted", [False, True])
def test_cuda_check_never_syncs_and_sees_a_bad_step_at_most_one_step_late(grafted):
    """observe + poll per step raise under torch.cuda.set_sync_debug_mode("error") if either waits
    for the GPU; a NaN loss at step 6 is reported after step 6 or 7."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8)).cuda()
    x, y = torch.randn(16, 32, device="cuda"), torch.randn(16, 8, device="cuda")
    sgd = torch.optim.SGD(model.parameters(), lr=1e-2)
    opt = Graft(torch.optim.Adam(model.parameters(), lr=1e-3), sgd, names=model) if grafted else sgd
    watch = NonFiniteWatch(opt, model, torch.device("cuda"))

    def step(i, poison=False):
        loss = torch.nn.functional.mse_loss(model(x), y) * (math.nan if poison else 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        watch.observe(i, loss.detach())
        return watch.poll()

    assert step(0) is None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert all(step(i) is None for i in range(1, 6))
        found = step(6, poison=True) or step(7) or watch.poll(wait=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert found.step == 6 and found.detected in (6, 7) and found.loss_step == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_stops_within_one_step_and_restarts():
    stopped = train(TrainConfig(**{**BERT, "device": "cuda"}, optimizer="sgd", lr=100.0, steps=30), progress=False)
    k = stopped.diverged_at
    # the flag of step k is read after step k + 1 was queued: at most one more step runs
    assert k is not None and stopped.steps in (k + 1, k + 2) and stopped.divergence.detected == stopped.steps - 1
    assert np.isfinite(stopped.metrics["loss"].to_numpy()[:k]).all()
    restarted = train(TrainConfig(**{**BERT, "device": "cuda"}, optimizer="sgd", lr=3.0, steps=30,
                                  on_divergence="restart", divergence_lr_factor=0.1), progress=False)
    assert restarted.restarts and restarted.diverged_at is None and math.isfinite(restarted.final["loss"])


def test_watch_reads_a_grafts_step_norms():
    model = torch.nn.Linear(3, 2)
    graft = Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1), names=model)
    watch = NonFiniteWatch(graft, model, torch.device("cpu"))
    model(torch.ones(1, 3)).sum().backward()
    graft.step()
    watch.observe(0, torch.tensor(1.0))
    assert watch.poll() is None and watch.what == "step norms"
    graft.last_stats[1, 1] = math.inf  # D's step on the bias
    watch.observe(1, torch.tensor(1.0))
    assert watch.poll().groups == {"bias": 1}
    graft.last_stats[1, 1] = 0.0
    graft.last_stats[2, :] = math.inf  # a zero D step: infinite ratios are not a divergence
    watch.reset()
    watch.observe(2, torch.tensor(1.0))
    assert watch.poll() is None


@pytest.mark.parametrize("changes, match", [
    (dict(on_divergence="retry"), "on_divergence"),
    (dict(divergence_lr_factor=1.0), "divergence_lr_factor"),
    (dict(divergence_lr_factor=0.0), "divergence_lr_factor"),
    (dict(divergence_lr_factor=math.nan), "divergence_lr_factor"),
    (dict(max_restarts=-1), "max_restarts"),
    (dict(checkpoint_every=5), "checkpoint_every needs checkpoint_dir"),
])
def test_bad_divergence_settings(changes, match):
    with pytest.raises(GraftlabError, match=match):
        TrainConfig(**changes).validate(outputs=False)


@pytest.mark.parametrize("every, point", [(5, 25), (8, 24), (12, 24), (20, 20)])
def test_checkpoint_every_without_a_dir_spaces_in_memory_restart_points(every, point):
    """Without a checkpoint_dir, ``checkpoint_every`` sets where the in-memory copies are taken: the
    first restart after the divergence at step 26 goes back to the newest multiple of it."""
    TrainConfig(on_divergence="restart", checkpoint_every=every).validate(outputs=False)
    result = _shift_fit(checkpoint_every=every, divergence_lr_factor=0.1)[0]
    assert (result.restarts[0].from_step, result.restarts[0].divergence.step) == (point, 26)
    assert result.restarts[0].source == "memory"


# --- distill and traces that diverged ----------------------------------------------------------------

def _trace(path, n=40, bad_from=None, restart_from=None, groups=("a", "b")):
    meta = metadata([{"name": g} for g in groups])
    stats = np.ones((n, 3, len(groups)), dtype=np.float32)
    stats[:, 0, :] = 2.0
    stats[:, 2, :] = 2.0
    stats[:, 0, 1] *= 3  # group b: ratio 6 = norm_m / norm_d (a /2 trace computes it on read)
    stats[:, 2, 1] *= 3
    if bad_from is not None:
        stats[bad_from:, 0, 0] = np.nan
        stats[bad_from:, 2, 0] = np.nan
        stats[bad_from + 1:, :, :] = np.inf
    scalars = {}
    if restart_from is not None:
        scalars[RESTART_COLUMN] = np.where(np.arange(n) >= restart_from, 1.0, 0.0)
    trace.prepare_directory(path)
    trace.write_sidecar(path, meta)
    for lo in range(0, n, 10):
        trace.write_part(path, trace.build_table(np.arange(lo, lo + 10), groups, stats[lo:lo + 10],
                                                 {k: v[lo:lo + 10] for k, v in scalars.items()}, meta))
    return path


def test_find_marks(tmp_path):
    df = trace.read_trace(_trace(tmp_path / "t", bad_from=25, restart_from=30))
    marks = find(df)
    assert marks == Marks(25, ("a",), 30, 1) and marks.first == 25
    assert "step norms not finite from step 25 in 1 group (a)" in marks.reason()


def test_distill_refuses_windows_after_non_finite_norms(tmp_path):
    path = _trace(tmp_path / "t", bad_from=25)
    with pytest.raises(GraftlabError, match=r"window of steps 20\.\.29 holds steps from a divergence on \(step norms not finite "
                                            r"from step 25 in 1 group \(a\)\); .*allow_divergence=True"):
        distill(path, window=10, start=20)
    # a window that starts after the divergence is refused too (the steps before it are scanned)
    with pytest.raises(GraftlabError, match="window of steps 30..39"):
        distill(path, window=10, start=30)
    # the windows before are fine; the drift window ends where the divergence begins
    corr = distill(path, window=10)
    assert corr.multipliers == {"a": 2.0, "b": 6.0} and corr.source["later_window_start"] == 15
    assert "divergence" not in corr.source
    forced = distill(path, window=10, start=20, allow_divergence=True)
    assert forced.source["divergence"]["windows"] == [[20, 30]]
    assert forced.source["divergence"]["nonfinite_step"] == 25


def test_distill_schedule_names_the_windows_after_a_divergence(tmp_path):
    path = _trace(tmp_path / "t", bad_from=25)
    with pytest.raises(GraftlabError, match=r"2 windows \(starting at steps 20, 30\) hold steps from a divergence on"):
        distill(path, window=10, schedule=True)


def test_a_foreign_trace_without_norms_marks_nothing(tmp_path):
    csv = tmp_path / "t.csv"  # another tool's table: no norm columns (read as unknown), one zero D step
    csv.write_text("step,group,ratio\n" + "".join(f"{s},a,{'inf' if s == 3 else 2.0}\n" for s in range(20)))
    corr = distill(csv, window=10)
    assert corr.multipliers == {"a": 2.0} and "divergence" not in corr.source


def test_cli_distill_refuses_and_allows(tmp_path):
    from typer.testing import CliRunner

    from graftlab.cli.app import app

    path = _trace(tmp_path / "t", restart_from=12)
    run = CliRunner().invoke(app, ["distill", str(path), "--window", "10", "--start", "5", "-o", str(tmp_path / "c.json")])
    assert isinstance(run.exception, GraftlabError) and "pass --allow-divergence to distill them" in str(run.exception)
    assert not (tmp_path / "c.json").exists()
    run = CliRunner().invoke(app, ["distill", str(path), "--window", "10", "--start", "5", "-o", str(tmp_path / "c.json"),
                                   "--allow-divergence"])
    assert run.exit_code == 0, run.output
    assert "warning: 1 window(s) hold steps that follow a divergence (from step 12)" in run.output


def test_cli_train_diverged_exits_3_with_one_line(tmp_path):
    out = tmp_path / "m.parquet"
    (tmp_path / "c.yaml").write_text("eval_size: 16\n")
    args = [sys.executable, "-m", "graftlab.cli.app", "train", "--task", "bert", "--optimizer", "sgd", "--lr", "100",
            "--steps", "20", "--batch-size", "8", "--eval-every", "0", "--device", "cpu", "--threads", "1",
            "--config", str(tmp_path / "c.yaml"), "--metrics", str(out), "--quiet"]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 3, run.stderr
    assert len(errors) == 1 and errors[0].startswith("error: training diverged at step ")
    assert "--on-divergence restart" in errors[0] and "Traceback" not in run.stderr
    frame, meta = read_metrics(out)  # the steps run are kept
    assert meta["diverged_at"] is not None and len(frame) == meta["diverged_at"] + 1


def test_restarts_find_their_checkpoints_beside_an_older_runs(tmp_path):
    """An older run left checkpoints after steps 40 and 45 in the folder: they are not this run's
    restart points, retention does not count them (the new run's step 0, 20 and 25 stay), and the
    run restarts exactly as in a folder of its own; resuming continues the new run, and the older
    run's checkpoints are untouched throughout."""
    ckpt = tmp_path / "ckpt"
    steady = TrainConfig(steps=45, eval_every=0, optimizer="sgd", lr=0.05, schedule="constant", warmup=0,
                         checkpoint_dir=str(ckpt), checkpoint_every=5)
    task = Shift()
    opt = make_optimizer("sgd", task.model.parameters(), 0.05)
    assert fit(steady, task, opt, schedule_owner=opt, progress=False).diverged_at is None
    older = {p.name: (p / "graftlab.json").read_text() for p in ckpt.iterdir()}
    assert sorted(older) == ["step-00000040", "step-00000045"]

    result, config, task, opt = _shift_fit(divergence_lr_factor=0.1, checkpoint_dir=str(ckpt), checkpoint_every=5)
    assert result.diverged_at is None and math.isfinite(result.final["loss"])
    assert [(r.from_step, r.divergence.step) for r in result.restarts] == [(25, 26), (20, 28)]
    assert result.lr_scale == pytest.approx(0.01)
    for name, meta in older.items():
        assert (ckpt / name / "graftlab.json").read_text() == meta
    more = fit(TrainConfig(**{**config.__dict__, "steps": 45, "resume": True}), task, opt, schedule_owner=opt,
               progress=False)
    assert more.metrics["step"].tolist() == list(range(40, 45)) and more.lr_scale == pytest.approx(0.01)
    for name, meta in older.items():
        assert (ckpt / name / "graftlab.json").read_text() == meta


@pytest.mark.parametrize("bad_from, restart_from", [(None, None), (25, None), (None, 30), (25, 30), (3, 12)])
def test_scan_streams_the_marks_find_gives(tmp_path, bad_from, restart_from):
    from graftlab.distill.divergence import scan

    path = _trace(tmp_path / "t", bad_from=bad_from, restart_from=restart_from, groups=("a", "b", "c"))
    assert scan(path) == find(trace.read_trace(path))
    assert scan(path, steps=(0, 20)) == find(trace.read_trace(path, steps=(0, 20)))


def test_distill_schedule_over_a_divergence_when_allowed(tmp_path):
    path = _trace(tmp_path / "t", n=60, bad_from=45)
    corr = distill(path, window=10, schedule=True, allow_divergence=True)
    assert corr.source["later_window_start"] == 50  # allowed: the trace's last window, as asked
    refused_drift = distill(path, window=10, schedule=False)
    assert refused_drift.source["later_window_start"] == 35  # else it ends where the divergence begins
    assert corr.source["divergence"]["windows"] == [[40, 50], [50, 60]]
    assert corr.schedule == {"a": [[0, 2.0]], "b": [[0, 6.0]]}
