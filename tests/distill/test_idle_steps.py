"""Steps where M's lr was 0 (ratio 0 in every group) are kept out of the medians, with a note."""
import numpy as np
import pytest

from graftlab.distill import idle
from graftlab.distill.pipeline import distill
from tests.trace_builder import metadata, write_trace

GROUPS = [{"name": "a.weight", "kind": "Q", "block": 0}, {"name": "b.weight", "kind": "ffn", "block": 0}]


def _trace(tmp_path, idle_steps=(0, 1, 2)):
    steps = np.arange(40)
    ratios = np.tile([4.0, 0.5], (40, 1))
    ratios[list(idle_steps)] = 0.0  # a warmup from lr 0: M took no step in any group
    ratios[10, 1] = 0.0  # one group at 0 on an ordinary step is data, not an idle step
    return write_trace(tmp_path / "t", metadata(GROUPS), steps, ratios, part_steps=20)


@pytest.mark.parametrize("schedule", [False, True])
def test_idle_steps_leave_the_medians_and_are_noted(tmp_path, schedule):
    path = _trace(tmp_path)
    with pytest.warns(UserWarning, match=r"3 step\(s\) where M took no step.*step\(s\) 0, 1, 2"):
        corr = distill(path, window=6, round="none", schedule=schedule)
    g = corr.group_sources
    # the first window (steps 0..5) holds 3 idle steps: its median is that of the 3 others, not 0 or 2
    assert g["a.weight"].median == 4.0 and g["b.weight"].median == 0.5
    assert g["a.weight"].n_finite == 3 and g["a.weight"].n_nonfinite == 3
    assert any("M took no step" in w for w in corr.source["warnings"])
    if schedule:
        assert corr.schedule["a.weight"][0] == [0, 4.0]


def test_a_trace_without_idle_steps_says_nothing(tmp_path):
    path = _trace(tmp_path, idle_steps=())
    corr = distill(path, window=6, round="none")
    assert not any("M took no step" in w for w in corr.source["warnings"])


def test_grid_and_rows_agree():
    values = np.array([[0.0, 1.0, 0.0, np.nan], [0.0, 2.0, 3.0, 0.0]])
    out, steps = idle.grid_without_idle(values, np.array([5, 6, 7, 8]))
    assert steps.tolist() == [5, 8] and np.isnan(out[:, [0, 3]]).all() and out[1, 2] == 3.0
    assert values[0, 0] == 0.0  # the caller's grid is left alone
