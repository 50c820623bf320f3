"""Live view: per-kind median ratios reach TensorBoard once per flush, never per step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graftlab
from graftlab.distill.degenerate import flag_groups
from graftlab.errors import GraftlabError
from tests import models

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from graftlab.integrations.tensorboard import DEFAULT_TAG, TensorBoardView, kind_medians  # noqa: E402


def run(path, steps, on_flush, flush_every=4, loss_tensor=False, zero_kbias=False):
    torch.set_num_threads(1)
    model = models.make("block", dtype=torch.float32)
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2),
                           torch.optim.SGD(model.parameters(), lr=0.1), names=model)
    with graftlab.Recorder(graft, path, flush_every=flush_every, model=model, on_flush=on_flush) as rec:
        for x, y in models.batches("block", steps, dtype=torch.float32):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            graft.step()
            graft.zero_grad()
            rec.log(loss=loss.detach())
    return graft


def reference(df, meta, lo, hi):
    """Per kind: median over unflagged groups of each group's median finite ratio in steps [lo, hi).

    The block's attention key bias has no true gradient (softmax is shift-invariant): the one
    degenerate group, left out as distill leaves it out."""
    win = df[(df.step >= lo) & (df.step < hi) & np.isfinite(df.ratio)]
    med = win.groupby("group")["ratio"].median()
    med = med[(flag_groups(med) == "") & (med.index != "key.bias")]
    kinds = {g["name"]: g["kind"] for g in meta["groups"]}
    out = {}
    for group, m in med.items():
        out.setdefault(kinds[group], []).append(m)
    return {k: float(np.median(v)) for k, v in out.items()}


def test_per_kind_medians_written_once_per_flush(tmp_path):
    tb = tmp_path / "tb"
    run(tmp_path / "t", 10, TensorBoardView(str(tb)), flush_every=4)
    df = graftlab.read_trace(tmp_path / "t")
    meta = df.attrs["graftlab"]
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    windows = [(0, 4), (4, 8), (8, 10)]
    want = [reference(df, meta, lo, hi) for lo, hi in windows]
    assert sorted(tags) == sorted(f"{DEFAULT_TAG}/{k}" for k in want[0])
    assert {"Q", "K", "V", "ffn", "norm"} <= {t.rsplit("/", 1)[1] for t in tags}
    for tag in tags:
        kind = tag.rsplit("/", 1)[1]
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [3, 7, 9]  # one point per flush, at its last step
        np.testing.assert_allclose([e.value for e in events], [w[kind] for w in want], rtol=1e-6)


def test_kind_medians_leave_flagged_groups_out():
    kb, k1 = "layer.0.attention.key.bias", "layer.0.attention.key.weight"
    meta = {"groups": [{"name": n, "kind": k} for n, k in
                       [("q1", "Q"), ("q2", "Q"), (kb, "K"), (k1, "K"), ("e", "embedding")]]}
    import pandas as pd

    rows = []
    for step in range(3):
        for group, ratio in [("q1", 2.0), ("q2", 4.0 + step), (kb, 1e7), (k1, 3.0), ("e", np.nan)]:
            rows.append({"step": step, "group": group, "ratio": ratio})
    got = kind_medians(pd.DataFrame(rows), meta)
    assert got == {"Q": 3.5, "K": 3.0}  # the key bias (far above its weight) degenerate, e never finite: both left out


def test_view_takes_an_existing_writer_and_closes_only_its_own(tmp_path):
    class Writer:
        def __init__(self):
            self.points, self.flushes, self.closed = [], 0, False

        def add_scalar(self, tag, value, global_step):
            self.points.append((tag, global_step))

        def flush(self):
            self.flushes += 1

        def close(self):
            self.closed = True

    writer = Writer()
    run(tmp_path / "t", 6, TensorBoardView(writer, tag="ratios/"), flush_every=3)
    assert writer.flushes == 2 and not writer.closed
    assert {s for _, s in writer.points} == {2, 5}
    assert all(tag.startswith("ratios/") and "//" not in tag for tag, _ in writer.points)


def test_rank_other_than_zero_creates_no_event_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    run(tmp_path / "t", 5, TensorBoardView(str(tmp_path / "tb")), flush_every=2)
    assert not (tmp_path / "tb").exists() and not (tmp_path / "t").exists()


def test_a_broken_writer_stops_the_recording_loudly(tmp_path):
    class Broken:
        def add_scalar(self, *a, **k):
            raise OSError("disk full")

    with pytest.raises(GraftlabError, match="disk full"):
        run(tmp_path / "t", 12, TensorBoardView(Broken()), flush_every=1)
