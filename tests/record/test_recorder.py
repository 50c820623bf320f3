"""Recorder in any script: rank-aware by itself, one dtype per logged column, the lr rule, the time
bound on flushes, on_flush callbacks and optimizer wrappers."""
from __future__ import annotations

import math
import types

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import graftlab
from graftlab import trace
from graftlab.record import recorder as record
from graftlab.errors import GraftlabError
from graftlab.record.recorder import Recorder
from tests import models


def setup():
    torch.set_num_threads(1)
    model = models.make("block", dtype=torch.float32)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, graftlab.Graft(adam, sgd, names=model)


def step(model, opt, x, y):
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def batches(n):
    return models.batches("block", n, dtype=torch.float32)


# -- rank awareness -------------------------------------------------------------------------------
def test_rank_other_than_zero_records_nothing_and_never_touches_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # torchrun's variable, before any process group exists
    model, opt = setup()
    path = tmp_path / "new" / "trace"
    with Recorder(opt, path, flush_every=2, flush_seconds=0.001, model=model) as rec:
        assert not rec.active
        assert not opt._optimizer_step_post_hooks and not opt._optimizer_step_pre_hooks
        for x, y in batches(5):
            rec.log(loss=step(model, opt, x, y), tokens=3)
        rec.flush()
        with pytest.raises(GraftlabError, match="record_lr"):  # every rank fails alike
            rec.log(lr=0.1)
    assert not (tmp_path / "new").exists()
    assert rec.parts == [] and rec.rows_flushed == 0
    assert "active=False" in repr(rec)
    # an existing trace there is no error either: rank 0 decides about the path
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "keep.txt").write_text("x")
    Recorder(opt, tmp_path / "new").close()
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["keep.txt"]


def test_rank_comes_from_the_process_group_when_there_is_one(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")  # the group's rank wins over the variable
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 3)
    model, opt = setup()
    rec = Recorder(opt, tmp_path / "t")
    rec.close()
    assert not rec.active and not (tmp_path / "t").exists()


def test_rank_zero_and_plain_runs_record(tmp_path, monkeypatch):
    for rank in ("0", None):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        model, opt = setup()
        with Recorder(opt, tmp_path / f"t{rank}") as rec:
            for x, y in batches(3):
                step(model, opt, x, y)
        assert rec.active
        assert len(graftlab.read_trace(tmp_path / f"t{rank}")) == 3 * len(opt.group_names)


# -- one dtype per logged column ------------------------------------------------------------------
def test_numbers_and_tensors_give_one_float64_column_in_every_part(tmp_path):
    """The case of shared/cases/turn2/log_mixed_types.py, and its kind: every way to log a value."""
    model, opt = setup()
    values = [1.0, torch.tensor(2.5), torch.tensor(3.25, dtype=torch.float64), 4, np.float32(5.5),
              torch.tensor(6, dtype=torch.int32), torch.tensor(7.5, dtype=torch.bfloat16), True]
    with Recorder(opt, tmp_path / "t", flush_every=3) as rec:
        for (x, y), v in zip(batches(len(values)), values):
            step(model, opt, x, y)
            rec.log(loss=v, **({"late": v} if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else {}))
    parts = sorted((tmp_path / "t").glob("part-*"))
    assert len(parts) == 3
    for part in parts:
        assert str(pq.read_schema(part).field("loss").type) == "double"
        assert str(pq.read_schema(part).field("lr").type) == "double"
    df = graftlab.read_trace(tmp_path / "t")
    assert df["loss"].dtype == np.float64 and df["late"].dtype == np.float64
    np.testing.assert_array_equal(df.groupby("step")["loss"].first(), [1.0, 2.5, 3.25, 4, 5.5, 6, 7.5, 1.0])
    late = df.groupby("step")["late"].first()
    assert late.loc[6] == 7.5 and late.drop(6).isna().all()
    assert len(pd.read_parquet(tmp_path / "t")) == len(df)  # pandas reads the parts as one table too


def test_a_value_logged_twice_for_a_step_keeps_the_last(tmp_path):
    model, opt = setup()
    with Recorder(opt, tmp_path / "t", flush_every=4) as rec:
        (x, y), (x2, y2), (x3, y3) = batches(3)
        step(model, opt, x, y)
        rec.log(loss=torch.tensor(1.0))
        rec.log(loss=2.0)  # a number after a tensor
        step(model, opt, x2, y2)
        rec.log(loss=3.0)
        rec.log(loss=torch.tensor(4.0))  # a tensor after a number
        step(model, opt, x3, y3)
    got = graftlab.read_trace(tmp_path / "t").groupby("step")["loss"].first()
    np.testing.assert_array_equal(got.to_numpy(), [2.0, 4.0, math.nan])


def test_read_trace_reads_traces_written_with_mixed_types(tmp_path):
    """Traces of graftlab 0.1: a scalar first logged as a float (float64 part), then as a tensor
    (float32 part), and an int column from another tool."""
    path = tmp_path / "t"
    path.mkdir()
    names = ["a.weight", "a.bias"]
    meta = {"format": trace.FORMAT_1, "groups": [{"name": n} for n in names]}
    stats = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2) + 1
    trace.write_part(path, trace.build_table([0, 1], names, stats, {"loss": np.array([1.5, 2.5])}, meta))
    trace.write_part(path, trace.build_table([2, 3], names, stats,
                                             {"loss": np.array([0.1, 3.5], dtype=np.float32)}, meta))
    table = trace.build_table([4], names, stats[:1], {"loss": np.array([7], dtype=np.float32)}, meta)
    import pyarrow as pa

    trace.write_part(path, table.set_column(5, "loss", pa.array([7, 7], pa.int64())))
    df = graftlab.read_trace(path)
    assert df["loss"].dtype == np.float64
    want = [1.5, 2.5, np.float32(0.1), 3.5, 7.0]
    np.testing.assert_array_equal(df.groupby("step")["loss"].first().to_numpy(), np.array(want, dtype=np.float64))
    assert list(df.step) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert len(graftlab.read_trace(path, steps=(2, 4), columns=["loss"])) == 4


def test_bad_logged_values_raise(tmp_path):
    model, opt = setup()
    with Recorder(opt, tmp_path / "t") as rec:
        (x, y), = batches(1)
        step(model, opt, x, y)
        with pytest.raises(GraftlabError, match="number or a one-element tensor"):
            rec.log(loss="low")
        with pytest.raises(GraftlabError, match="scalar"):
            rec.log(loss=torch.ones(2))
        with pytest.raises(GraftlabError, match="trace column"):
            rec.log(step=3)


@pytest.mark.parametrize("grad_every", [1, 0])
@pytest.mark.parametrize("key", ["norm_g", "ratio", "norm_m", "\ud800"])
def test_a_bad_scalar_name_is_refused_at_log_and_the_buffered_rows_are_written(tmp_path, key, grad_every):
    # norm_g (the gradient-norm column) used to be accepted here, then close() failed in the writer
    # with "clashes with a trace column" and every buffered row was lost
    model, opt = setup()
    with Recorder(opt, tmp_path / "t", flush_every=100, grad_every=grad_every) as rec:
        for i, (x, y) in enumerate(batches(4)):
            rec.log(loss=step(model, opt, x, y))
            if i == 2:
                with pytest.raises(GraftlabError, match="cannot log") as err:
                    rec.log(**{key: 1.0})
                assert "\n" not in str(err.value)
    df = graftlab.read_trace(tmp_path / "t")
    assert sorted(df.step.unique()) == [0, 1, 2, 3] and df["loss"].notna().all()
    assert key not in df.columns or key in ("norm_g", "ratio", "norm_m")
    if key == "norm_g" and grad_every == 0:
        assert "norm_g" not in df.columns  # not a float64 scalar column pretending to be gradient norms


def test_a_bad_scalar_name_that_reaches_the_writer_costs_its_column_not_the_rows(tmp_path):
    # log() refuses these names; the writer's own guard keeps the rows if one gets past it anyway
    model, opt = setup()
    with pytest.warns(UserWarning, match="'norm_g' not written"):
        with Recorder(opt, tmp_path / "t", flush_every=100) as rec:
            for x, y in batches(3):
                rec.log(loss=step(model, opt, x, y))
                rec._buffer.put(rec._steps.row, "norm_g", 5.0)
    df = graftlab.read_trace(tmp_path / "t")
    assert sorted(df.step.unique()) == [0, 1, 2] and df["loss"].notna().all()
    assert not (df["norm_g"] == 5.0).any()


def test_restart_stays_a_loggable_scalar(tmp_path):
    model, opt = setup()
    with Recorder(opt, tmp_path / "t") as rec:
        for x, y in batches(2):
            step(model, opt, x, y)
            rec.log(restart=0)
    assert (graftlab.read_trace(tmp_path / "t")["restart"] == 0).all()


# -- lr: the automatic column wins ----------------------------------------------------------------
def test_log_lr_is_an_error_while_the_recorder_writes_lr(tmp_path):
    model, opt = setup()
    sched = torch.optim.lr_scheduler.LambdaLR(opt.magnitude, lambda s: 0.5 ** s)
    with Recorder(opt, tmp_path / "t") as rec:
        for x, y in batches(3):
            step(model, opt, x, y)
            sched.step()
            with pytest.raises(GraftlabError, match="record_lr=False"):
                rec.log(lr=sched.get_last_lr()[0])  # the next step's lr: what the old example logged
    lrs = graftlab.read_trace(tmp_path / "t").groupby("step")["lr"].first().to_numpy()
    np.testing.assert_allclose(lrs, [1e-2, 5e-3, 2.5e-3], rtol=0, atol=0)  # the lr each step used


def test_record_lr_false_lets_the_user_log_lr(tmp_path):
    model, opt = setup()
    with Recorder(opt, tmp_path / "t", record_lr=False) as rec:
        for i, (x, y) in enumerate(batches(3)):
            step(model, opt, x, y)
            rec.log(lr=0.1 * (i + 1))
    lrs = graftlab.read_trace(tmp_path / "t").groupby("step")["lr"].first().to_numpy()
    np.testing.assert_allclose(lrs, [0.1, 0.2, 0.3])


def test_module_docstring_example_runs_and_records_the_lr_each_step_used(tmp_path, monkeypatch):
    doc = record.__doc__
    code = doc.split("::\n", 1)[1].split("\n\n", 1)[0]
    code = "\n".join(line[4:] for line in code.splitlines())
    class LossModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = models.make("block", dtype=torch.float32)

        def forward(self, x):
            return self.net(x).pow(2).mean()

    model = LossModel()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda s: 1.0 / (s + 1))
    loader = [x for x, _ in batches(4)]
    monkeypatch.chdir(tmp_path)
    exec(code, {"graftlab": graftlab, "adam": adam, "sgd": sgd, "sched": sched, "loader": loader,
                "model": model, "torch": torch})
    df = graftlab.read_trace(tmp_path / "runs" / "trace")
    np.testing.assert_allclose(df.groupby("step")["lr"].first(), [1e-2 / (s + 1) for s in range(4)])
    assert df["loss"].notna().all()


# -- flushes: step bound and time bound -----------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.now


def test_flush_seconds_flushes_at_the_first_step_after_the_bound(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(record.time, "monotonic", clock)
    model, opt = setup()
    data = batches(9)
    with Recorder(opt, tmp_path / "t", flush_every=100, flush_seconds=10) as rec:
        flushed = []
        for i, (x, y) in enumerate(data):
            clock.now = 1000.0 + [0, 3, 6, 9.9, 10.0, 11, 12, 25, 26][i]
            step(model, opt, x, y)
            flushed.append(rec.rows_flushed)
        assert clock.calls <= 2 * len(data)  # a host clock read per step, nothing more
    # rows 0-3 were written at step 4 (10 s after row 0 was buffered); rows 4-6 at step 7
    assert flushed == [0, 0, 0, 0, 4, 4, 4, 7, 7]
    assert [trace.part_first_step(p) for p in sorted((tmp_path / "t").glob("part-*"))] == [0, 4, 7]
    assert len(graftlab.read_trace(tmp_path / "t")) == 9 * len(opt.group_names)


def test_flush_seconds_none_keeps_only_the_step_bound(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(record.time, "monotonic", clock)
    model, opt = setup()
    with Recorder(opt, tmp_path / "t", flush_every=3, flush_seconds=None) as rec:
        for x, y in batches(5):
            clock.now += 3600
            step(model, opt, x, y)
        assert rec.rows_flushed == 3
    assert rec.flush_seconds is None


def test_default_flush_bounds(tmp_path):
    model, opt = setup()
    rec = Recorder(opt, tmp_path / "t")
    rec.close()
    assert (rec.flush_every, rec.flush_seconds) == (100, 30.0)


@pytest.mark.parametrize("bad", [0, -1.0, "30", math.nan])
def test_bad_flush_seconds(tmp_path, bad):
    model, opt = setup()
    with pytest.raises(GraftlabError, match="flush_seconds"):
        Recorder(opt, tmp_path / "t", flush_seconds=bad)
    assert not (tmp_path / "t").exists()


# -- on_flush callbacks ---------------------------------------------------------------------------
def test_on_flush_gets_each_part_once_in_the_writer_thread(tmp_path):
    import threading

    seen = []

    class Sink:
        closed = False

        def __call__(self, table, meta):
            seen.append((table.column("step").to_pylist(), meta["groups"][0]["name"],
                         threading.current_thread().name))

        def close(self):
            Sink.closed = True

    model, opt = setup()
    with Recorder(opt, tmp_path / "t", flush_every=2, on_flush=[Sink()]) as rec:
        for x, y in batches(5):
            step(model, opt, x, y)
    g = len(opt.group_names)
    assert [s[0] for s in seen] == [[0] * g + [1] * g, [2] * g + [3] * g, [4] * g]
    assert {s[1] for s in seen} == {opt.group_names[0]}
    assert {s[2] for s in seen} == {"graftlab-trace-writer"}
    assert Sink.closed and len(rec.parts) == 3


def test_a_failing_on_flush_stops_recording_with_an_error(tmp_path):
    def boom(table, meta):
        raise RuntimeError("dashboard down")

    model, opt = setup()
    rec = Recorder(opt, tmp_path / "t", flush_every=1, on_flush=boom)
    with pytest.raises(GraftlabError, match="dashboard down"):
        for x, y in batches(20):
            step(model, opt, x, y)
    rec._closed = True  # detach without raising again
    for hook in rec._hooks:
        hook.remove()
    rec._writer.jobs.put(None)
    rec._writer.join()
    with pytest.raises(GraftlabError, match="on_flush"):
        Recorder(opt, tmp_path / "u", on_flush=[42])


# -- wrappers around the Graft --------------------------------------------------------------------
def test_finds_the_graft_inside_duck_typed_wrappers(tmp_path):
    """Wrappers that keep the optimizer in ``.optimizer`` or ``._optimizer`` (DeepSpeed-style); the
    real Lightning, Fabric and accelerate wrappers are tested in tests/integrations/."""
    model, opt = setup()
    for i, wrapper in enumerate((types.SimpleNamespace(optimizer=opt), types.SimpleNamespace(_optimizer=opt))):
        rec = Recorder(wrapper, tmp_path / f"t{i}")
        assert rec.graft is opt
        rec.close()
    with pytest.raises(GraftlabError, match="needs a graftlab.Graft"):
        Recorder(types.SimpleNamespace(optimizer=opt.magnitude), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- groups added to the Graft while recording ----------------------------------------------------
def test_groups_added_while_recording_are_recorded_from_then_on(tmp_path):
    """Progressive unfreezing: the head trains first, then Graft.add_param_group adds the body.
    The directory's sidecar, the one copy of the metadata, lists them all in order of addition."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    body, head = list(model[:2].parameters()), list(model[2].parameters())
    graft = graftlab.Graft(torch.optim.Adam(head, lr=1e-2), torch.optim.SGD(head, lr=0.1), names=model)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    seen = []
    with Recorder(graft, tmp_path / "t", flush_every=4, model=model) as rec:
        for t in range(7):
            if t == 3:
                graft.add_param_group({"params": body})
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            graft.step()
            graft.zero_grad()
            rec.log(loss=loss.detach())
            seen.append(graft.last_stats.clone())
    df = graftlab.read_trace(tmp_path / "t")
    head_names, body_names = ["2.weight", "2.bias"], ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert df.groupby("step").size().tolist() == [2, 2, 2, 6, 6, 6, 6]
    assert list(df[df.step == 5].group) == head_names + body_names
    for t in range(7):
        np.testing.assert_array_equal(df[df.step == t].ratio.to_numpy(), seen[t][2].numpy())
    assert df["loss"].notna().all()
    # /2 keeps the metadata once, in the sidecar: it lists every group recorded
    assert [g["name"] for g in trace.read_metadata(tmp_path / "t")["groups"]] == head_names + body_names
    import json

    grown = json.loads((tmp_path / "t" / trace.SIDECAR).read_text())
    assert [g["name"] for g in grown["groups"]] == head_names + body_names
    assert {g["name"]: g["kind"] for g in grown["groups"]}["1.weight"] == "norm"


@pytest.mark.parametrize("kwargs,message,param", [
    (dict(every=None), "every must be a whole number >= 1, got None", "every"),
    (dict(every="x"), "every must be a whole number >= 1, got 'x'", "every"),
    (dict(every=True), "every must be a whole number >= 1, got True", "every"),
    (dict(flush_every=2.5), "flush_every must be a whole number in [1, 1000000], got 2.5", "flush_every"),
    (dict(flush_every=10**11), "flush_every must be a whole number in [1, 1000000]", "flush_every"),
    (dict(grad_every=-1), "grad_every must be a whole number >= 0, got -1", "grad_every"),
    (dict(start_step=1.5), "start_step must be a whole number >= 0, got 1.5", "start_step"),
    (dict(flush_seconds=float("inf")), "flush_seconds must be a positive number of seconds", "flush_seconds"),
    (dict(overwrite="yes"), "overwrite must be True or False, got 'yes'", "overwrite"),
    (dict(metadata=["task"]), "metadata must be a mapping (a dict) or None, got list", "metadata"),
    (dict(model="bert"), "model must be a torch.nn.Module or None, got str", "model"),
])
def test_wrong_argument_types_are_one_error_each_and_nothing_is_written(tmp_path, kwargs, message, param):
    """Refused up front (no truncating 2.5 to 2, no TypeError from int(None)), before the path is touched."""
    _, opt = setup()
    with pytest.raises(GraftlabError) as err:
        Recorder(opt, tmp_path / "t", **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert err.value.params == (param,)
    assert not (tmp_path / "t").exists()


# -- after close ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", ["0", "1"])
def test_log_after_close_is_an_error_and_closing_twice_is_not(tmp_path, monkeypatch, rank):
    monkeypatch.setenv("RANK", rank)  # every rank fails alike
    model, opt = setup()
    (x, y), (x2, y2) = batches(2)
    rec = Recorder(opt, tmp_path / "t", model=model)
    rec.log(loss=step(model, opt, x, y))
    rec.close()
    with pytest.raises(GraftlabError, match=r"the Recorder is closed.*log\(\) before close\(\)") as err:
        rec.log(loss=step(model, opt, x2, y2))
    assert isinstance(err.value, RuntimeError)  # a call at the wrong time, as on a closed file
    rec.close()  # closing twice stays fine
    rec.flush(), rec.sync()  # nothing is buffered after close: nothing to lose
    if rank == "0":
        df = graftlab.read_trace(tmp_path / "t")
        assert sorted(df["step"].unique()) == [0] and df["loss"].notna().all()
