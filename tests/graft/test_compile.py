"""``torch.compile(graft.step)`` with a Recorder attached: the Recorder's hooks are host-side
bookkeeping and stay out of the traced region (no graph break warning), and the trace is the one
an eager run records."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import graftlab


def _run(tmp_path, name: str, compiled: bool, flush_seconds):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(model.parameters(), lr=0.1),
                           names=model)
    step = torch.compile(graft.step, backend="eager") if compiled else graft.step
    data = torch.randn(3, 8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with graftlab.Recorder(graft, tmp_path / name, flush_every=2, flush_seconds=flush_seconds) as rec:
            for x in data:
                loss = model(x).pow(2).mean()
                graft.zero_grad()
                loss.backward()
                step()
                rec.log(loss=loss.detach())
    return graftlab.read_trace(tmp_path / name), [str(w.message) for w in caught]


@pytest.mark.parametrize("flush_seconds", [None, 30.0])
def test_compiled_step_records_without_graph_break_warnings(tmp_path, flush_seconds):
    torch._dynamo.reset()
    df, caught = _run(tmp_path, "compiled", True, flush_seconds)
    dynamo = [m for m in caught if "Dynamo" in m or "graph break" in m.lower() or "monotonic" in m]
    assert dynamo == []
    eager, _ = _run(tmp_path, "eager", False, flush_seconds)
    assert sorted(df["step"].unique()) == [0, 1, 2]
    cols = ["step", "group", "norm_m", "norm_d", "loss"]
    got = df[cols].sort_values(["step", "group"]).reset_index(drop=True)
    want = eager[cols].sort_values(["step", "group"]).reset_index(drop=True)
    assert (got[["step", "group"]] == want[["step", "group"]]).all().all()
    np.testing.assert_allclose(got[["norm_m", "norm_d", "loss"]].to_numpy(), want[["norm_m", "norm_d", "loss"]].to_numpy(),
                               rtol=1e-5)
