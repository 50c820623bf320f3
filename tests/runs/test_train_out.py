"""``graftlab train --out DIR``: the run's results, model and metrics outlive the terminal."""
import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from graftlab.cli.app import app
from graftlab.errors import GraftlabError
from graftlab.tasks import get_task

ARGS = ["train", "--task", "resnet", "--optimizer", "sgd", "--lr", "0.05", "--steps", "3", "--batch-size", "8",
        "--eval-every", "0", "--threads", "1", "--quiet"]


def test_out_writes_results_model_and_metrics_and_keeps_them(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [*ARGS, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["metrics.parquet", "model.pt", "result.json"]
    result = json.loads((out / "result.json").read_text())
    assert result["format"] == "graftlab.train-result/1" and result["steps"] == 3
    assert set(result["final"]) == {"heldout_loss", "heldout_accuracy"}
    assert result["config"]["lr"] == 0.05 and result["config"]["optimizer"] == "sgd"
    assert len(pd.read_parquet(out / "metrics.parquet")) == 3
    # the saved state loads into the task's model and is the trained one, not the initialisation
    model = get_task("resnet", batch_size=8).model
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(torch.load(out / "model.pt"))
    assert any(not torch.equal(fresh[k], v) for k, v in model.state_dict().items())
    # a second run refuses to replace them, leaving every file as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = CliRunner().invoke(app, [*ARGS, "--out", str(out)])
    assert again.exit_code != 0 and "already exists" in str(again.exception)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_out_with_metrics_elsewhere_and_a_file_in_the_way(tmp_path):
    out, metrics = tmp_path / "run", tmp_path / "m.parquet"
    res = CliRunner().invoke(app, [*ARGS, "--out", str(out), "--metrics", str(metrics)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "result.json"] and metrics.exists()
    assert json.loads((out / "result.json").read_text())["metrics"] == str(metrics)
    (tmp_path / "f").write_text("keep")
    bad = CliRunner().invoke(app, [*ARGS, "--out", str(tmp_path / "f")])
    assert bad.exit_code != 0 and "is a file" in str(bad.exception)
    assert (tmp_path / "f").read_text() == "keep"


def test_metrics_that_are_out_or_one_of_its_files_are_refused_before_training(tmp_path):
    """``--out tr --metrics tr/result.json`` would have the result overwrite the metrics at the end."""
    from graftlab.runs.train_out import check_out

    for metrics in ("tr/result.json", "tr/model.pt", "tr"):
        with pytest.raises(GraftlabError, match="one of the files it receives") as err:
            check_out(tmp_path / "tr", metrics=str(tmp_path / metrics))
        assert err.value.params == ("metrics", "out")
    assert not (tmp_path / "tr").exists()
    assert check_out(tmp_path / "tr", metrics=str(tmp_path / "tr" / "m.parquet")) == tmp_path / "tr"
