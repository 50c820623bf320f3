"""record -> distill -> train from the command line, on the built-in tasks at tiny sizes."""
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import graftlab.runs.run as train_module
from graftlab.cli.app import app
from graftlab.errors import GraftlabError
from graftlab.corrections import load_corrections
from graftlab.trace import read_trace

runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert res.exit_code == 0, f"{args[0]} failed: {res.exception!r}\n{res.output}"
    return res


def small_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("batch_size: 4\neval_every: 0\neval_size: 8\n")
    return cfg


@pytest.mark.slow
def test_bert_adam_sgd_layer_trace_to_corrected_sgd(tmp_path, monkeypatch):
    cfg = small_config(tmp_path)
    trace = tmp_path / "bert.trace"
    invoke("record", "--task", "bert", "--magnitude", "adam", "--direction", "sgd", "--granularity", "layer",
           "--steps", 12, "--out", trace, "--config", cfg, "--device", "cpu", "--quiet")
    res = invoke("distill", trace, "--window", 6, "--round", "D500")
    assert "degenerate" in res.output  # the attention K bias of every block
    corr_path = tmp_path / "bert.trace.corrections.json"
    corr = load_corrections(corr_path)
    names = [g["name"] for g in read_trace(trace, steps=(0, 1)).attrs["graftlab"]["groups"]]
    assert list(corr.multipliers) == names
    info = corr.group_sources
    for n in names:
        if info[n].flags and info[n].block is None:
            continue  # a stand-in median; checked in test_distill
        want = 500.0 if info[n].block is not None else min(max(10.0 ** np.floor(np.log10(info[n].median)), 0.1), 100.0)
        assert corr.multipliers[n] == pytest.approx(want, rel=1e-12), n
    assert any(d.flags == "degenerate" and ".key.bias" in n for n, d in info.items())

    built = []
    real = train_module.make_optimizer
    monkeypatch.setattr(train_module, "make_optimizer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    base = corr.direction_lr
    metrics = tmp_path / "sgd.parquet"
    invoke("train", "--task", "bert", "--optimizer", "sgd", "--lr", base, "--corrections", corr_path,
           "--steps", 3, "--schedule", "constant", "--warmup", 0, "--config", cfg, "--device", "cpu",
           "--metrics", metrics, "--quiet")
    (opt,) = built
    assert [g["name"] for g in opt.param_groups] == names
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(base * corr.multipliers[g["name"]], rel=1e-12)
        assert g["initial_lr"] == pytest.approx(base * corr.multipliers[g["name"]], rel=1e-12)
    df = pd.read_parquet(metrics)
    assert len(df) == 3 and np.isfinite(df["loss"]).all()


@pytest.mark.slow
def test_resnet_global_sgd_adagrad_schedule_followed_step_by_step(tmp_path):
    cfg = small_config(tmp_path)
    trace = tmp_path / "resnet.trace"
    steps, window = 12, 3
    invoke("record", "--task", "resnet", "--magnitude", "sgd", "--direction", "adagrad", "--granularity", "global",
           "--steps", steps, "--out", trace, "--config", cfg, "--device", "cpu", "--quiet")
    invoke("distill", trace, "--window", window)  # a global trace gives a schedule by default
    corr = load_corrections(tmp_path / "resnet.trace.corrections.json")
    assert corr.multipliers == {} and list(corr.schedule) == ["global"]
    # the schedule is the windowed medians of the recorded ratios (consecutive equal ones merged)
    df = read_trace(trace)
    ratio = df["ratio"].to_numpy(dtype=np.float64)
    want = []
    for s in range(0, steps, window):
        w = ratio[s:s + window]
        m = float(np.median(w[np.isfinite(w)]))
        if not want or want[-1][1] != m:
            want.append([s, m])
    assert corr.schedule["global"] == want

    metrics = tmp_path / "adagrad.parquet"
    base = corr.direction_lr
    invoke("train", "--task", "resnet", "--optimizer", "adagrad", "--lr", base, "--corrections",
           tmp_path / "resnet.trace.corrections.json", "--steps", steps, "--schedule", "constant", "--warmup", 0,
           "--config", cfg, "--device", "cpu", "--metrics", metrics, "--quiet")
    lr = pd.read_parquet(metrics)["lr"].to_numpy()
    starts = [s for s, _ in want]
    expect = [base * want[np.searchsorted(starts, t, side="right") - 1][1] for t in range(steps)]
    np.testing.assert_allclose(lr, expect, rtol=1e-12)


def test_train_rejects_bad_corrections(tmp_path):
    """Bad corrections files stop `graftlab train` before it trains, with one error line."""
    import json

    from graftlab.errors import GraftlabError

    cfg = small_config(tmp_path)
    cases = {
        "nan.json": ({"format": "graftlab.corrections/1", "multipliers": {"conv1.weight": float("nan")}}, "finite and positive"),
        "neg.json": ({"format": "graftlab.corrections/1", "multipliers": {"conv1.weight": -2.0}}, "finite and positive"),
        "other.json": ({"format": "graftlab.corrections/1",
                        "multipliers": {"blocks.0.attn.query.weight": 500.0, "embed.word.weight": 100.0}},
                       "another model"),
        "part.json": ({"format": "graftlab.corrections/1", "multipliers": {"conv1.weight": 2.0}},
                      "pass --allow-missing to keep factor 1"),
    }
    for name, (payload, msg) in cases.items():
        p = tmp_path / name
        p.write_text(json.dumps(payload))
        res = runner.invoke(app, ["train", "--task", "resnet", "--optimizer", "sgd", "--corrections", str(p),
                                  "--steps", "1", "--config", str(cfg), "--device", "cpu", "--quiet"])
        assert res.exit_code != 0
        assert isinstance(res.exception, GraftlabError), res.output
        assert msg in str(res.exception) and "\n" not in str(res.exception)
        assert "allow_missing" not in str(res.exception)


def test_cli_says_the_parameters_an_error_names_as_its_flags():
    """An error names its parameters (``param=``); the CLI says each as the running command's flag
    for it, from the error's parameters and the command's options: no message text is parsed."""
    import typer

    from graftlab.cli.app import flag_namer

    commands = typer.main.get_command(app).commands
    train, distill, info = (commands[n].params for n in ("train", "distill", "info"))
    err = GraftlabError("{checkpoint_every} and {resume=True} need {checkpoint_dir}; pass {overwrite=True}, not "
                        "{allow_missing=True}, for steps in /runs/checkpoint_dir/x or checkpoint_dir.json",
                        param=("checkpoint_every", "resume", "checkpoint_dir", "overwrite", "allow_missing"))
    assert str(err) == ("checkpoint_every and resume=True need checkpoint_dir; pass overwrite=True, not "
                        "allow_missing=True, for steps in /runs/checkpoint_dir/x or checkpoint_dir.json")
    assert err.say(flag_namer(train)) == (
        "--checkpoint-every and --resume need --checkpoint-dir; pass --overwrite, not --allow-missing, "
        "for steps in /runs/checkpoint_dir/x or checkpoint_dir.json")
    err = GraftlabError("{window=0} with {schedule=False} and {tie='('} for the window", param=("window", "schedule", "tie"))
    assert err.say(flag_namer(distill)) == "--window 0 with --static and --tie '(' for the window"
    # names that are not the command's options stay the library's; an English word is never a flag
    err = GraftlabError("{checkpoint_dir} and {overwrite=True}: the window and the steps", param=("checkpoint_dir", "overwrite"))
    assert err.say(flag_namer(info)) == "checkpoint_dir and overwrite=True: the window and the steps"
    # a value from a config file is named as the file's key
    err = GraftlabError("{warmup} (50 steps) must be shorter than training", param="warmup")
    assert err.say(flag_namer(train, {"warmup": "run.toml"})) == (
        "config key 'warmup' (run.toml) (50 steps) must be shorter than training")


def test_errors_keep_their_parameters_across_processes():
    """A worker's error pickles with its parameters, so the parent's CLI still names the flag."""
    import pickle

    from graftlab.errors import OutputExistsError

    err = pickle.loads(pickle.dumps(GraftlabError("{window} must be > 0", param="window")))
    assert err.params == ("window",) and str(err) == "window must be > 0"
    err = pickle.loads(pickle.dumps(OutputExistsError("x.json", "{out}")))
    assert err.params == ("overwrite", "out") and err.path == "x.json"
    assert str(err) == "out 'x.json' already exists; pass overwrite=True to replace it"


def test_packaging_lists_every_package_and_installs_the_cli_as_graftlab_cli():
    """cli/ installs as graftlab.cli (not a top-level ``cli`` that other projects clash with)."""
    import tomllib
    from pathlib import Path

    import graftlab.cli

    root = Path(__file__).resolve().parents[1]
    conf = tomllib.loads((root / "pyproject.toml").read_text())
    tool = conf["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "graftlab").rglob("__init__.py")}
    assert set(tool["packages"]) == on_disk | {"graftlab.cli"}
    assert tool["package-dir"] == {"graftlab.cli": "cli"}
    assert conf["project"]["scripts"]["graftlab"] == "graftlab.cli.app:main"
    assert Path(graftlab.cli.__file__).resolve().parent == root / "cli"


@pytest.mark.slow
@pytest.mark.parametrize("granularity,extra", [("head", []), ("vocab", ["--row-block", 100])])
def test_gpt_per_head_and_per_row_block_trace_to_corrected_sgd(tmp_path, monkeypatch, granularity, extra):
    cfg = small_config(tmp_path)
    trace = tmp_path / "gpt.trace"
    invoke("record", "--task", "gpt", "--granularity", granularity, *extra, "--steps", 6, "--out", trace,
           "--config", cfg, "--device", "cpu", "--quiet")
    groups = set(read_trace(trace)["group"])
    assert "blocks.1.attn.key.weight[head 3]" in groups and "blocks.0.attn.out.weight[head 0]" in groups
    assert ("head.decoder.weight[rows 0-99]" in groups) == (granularity == "vocab")
    assert ("head.decoder.weight" in groups) == (granularity == "head")
    invoke("distill", trace, "--window", 3, "--schedule")
    corr_path = tmp_path / "gpt.trace.corrections.json"
    assert set(load_corrections(corr_path).schedule) == groups  # per-slice schedules
    res = invoke("show", corr_path, "--by", "kind")
    assert "Q" in res.output and "output" in res.output
    built = []
    real = train_module.make_optimizer
    monkeypatch.setattr(train_module, "make_optimizer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    invoke("train", "--task", "gpt", "--corrections", corr_path, "--steps", 2, "--config", cfg, "--device", "cpu",
           "--quiet")
    (opt,) = built
    scaled = {g["name"]: g for g in opt.param_groups if g.get("lr_scale") is not None}
    assert "blocks.0.attn.query.weight" in scaled and scaled["blocks.0.attn.query.weight"]["lr_scale"].shape == (64, 1)
    assert ("head.decoder.weight" in scaled) == (granularity == "vocab")
