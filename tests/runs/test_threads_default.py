"""record and train run on one CPU thread unless told otherwise (as the demo and experiments do)."""
import torch
from typer.testing import CliRunner

from graftlab.cli.app import app
from graftlab.runs import RecordConfig, TrainConfig, make_config


def test_one_thread_by_default_and_more_on_request(tmp_path):
    assert TrainConfig().threads == 1 and RecordConfig().threads == 1
    assert make_config(None, task="bert").threads == 1
    assert make_config(None, task="bert", threads=2).threads == 2
    (tmp_path / "c.yaml").write_text("threads: null\n")  # a config file can ask for PyTorch's own count
    assert make_config(tmp_path / "c.yaml", task="bert").threads is None


def test_train_sets_one_thread(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        res = CliRunner().invoke(app, ["train", "--task", "resnet", "--optimizer", "sgd", "--steps", "1", "--batch-size",
                                       "4", "--eval-every", "0", "--quiet"])
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_help_says_the_default():
    res = CliRunner().invoke(app, ["record", "--help"], terminal_width=200)
    assert "default: 1" in " ".join(res.output.split())
