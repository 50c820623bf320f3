"""The shared training loop, configs, metrics files and the plain trainer (with corrections)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graftlab import Graft
from graftlab.errors import GraftlabError
from graftlab.graft.optimizers import make_optimizer
from graftlab.graft.schedules import make_schedule
from graftlab.tasks import get_task
from graftlab.tasks.base import Task
from graftlab.runs import TrainConfig, load_config, make_config, resolve_config, total_steps
from graftlab.runs import fit, read_metrics, train
from typer.testing import CliRunner
from graftlab.cli.app import app

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


class ToyTask(Task):
    """Linear regression on fixed data: the loop's logic without a real model's cost."""

    name, size, default_schedule, default_warmup = "toy", "tiny", "poly", 0.0

    def __init__(self, seed=0, batch_size=8):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(64, 5, generator=g)
        self.y = self.x @ torch.randn(5, 1, generator=g)
        self.batch_size, self.seed, self.device, self.num_train = batch_size, seed, torch.device("cpu"), 64
        self.steps_per_epoch = 64 // batch_size
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(5, 1)

    def make_batch(self, index, gen):
        return self.x[index], self.y[index]

    def loss(self, model, batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    def eval_batches(self):
        return [(self.x, self.y)]

    def correct(self, model, batch):
        err = (model(batch[0]) - batch[1]).pow(2)
        return err.sum(), (err < 0.1).sum(), torch.tensor(err.numel())

    def info(self):
        return {"task": "toy"}


def toy_fit(tmp_path=None, **cfg):
    config = TrainConfig(**{"steps": 20, "eval_every": 10, "log_every": 5, "lr": 0.05, "optimizer": "sgd", **cfg})
    task = ToyTask(seed=config.seed)
    opt = make_optimizer(config.optimizer, task.model.parameters(), config.lr)
    return fit(config, task, opt, schedule_owner=opt, progress=False), task


# --- the loop ---------------------------------------------------------------------------------------

def test_metrics_frame_lr_and_eval_rows(tmp_path):
    out = tmp_path / "m.parquet"
    result, task = toy_fit(metrics=str(out), schedule="poly", warmup=4)
    df = result.metrics
    assert list(df.columns) == ["step", "loss", "lr", "eval_loss", "eval_accuracy"]
    assert df["step"].tolist() == list(range(20)) and df["step"].dtype == np.int64
    sched = make_schedule("poly", 20, 4)
    assert df["lr"].to_numpy() == pytest.approx([0.05 * sched(s) for s in range(20)])
    evaluated = df.index[df["eval_loss"].notna()].tolist()
    assert evaluated == [9, 19]
    assert df["eval_loss"].iloc[19] == pytest.approx(result.final["loss"])
    assert result.final == task.evaluate(task.model)
    assert df["loss"].iloc[-5:].mean() < df["loss"].iloc[:5].mean()

    frame, meta = read_metrics(out)
    assert frame.equals(df)
    assert meta["format"] == "graftlab.metrics/1" and meta["config"]["schedule"] == "poly"
    assert meta["config"]["lr"] == 0.05 and meta["config"]["steps"] == 20 and meta["steps"] == 20
    assert meta["optimizer"]["class"] == "torch.optim.sgd.SGD" and meta["task"] == {"task": "toy"}
    assert meta["final"] == pytest.approx(result.final)


def test_existing_metrics_file_is_kept(tmp_path):
    out = tmp_path / "m.parquet"
    out.write_bytes(b"precious")
    with pytest.raises(GraftlabError, match="already exists"):
        toy_fit(metrics=str(out))
    assert out.read_bytes() == b"precious"
    config = TrainConfig(steps=3, eval_every=0, optimizer="sgd", lr=0.1)
    task = ToyTask()
    opt = make_optimizer("sgd", task.model.parameters(), 0.1)
    fit(config, task, opt, schedule_owner=opt, metrics_path=out, overwrite=True, progress=False)
    assert len(read_metrics(out)[0]) == 3


def test_schedule_owner_is_the_magnitude_child_of_a_graft():
    task = ToyTask()
    adam = torch.optim.Adam(task.model.parameters(), lr=0.01)
    sgd = torch.optim.SGD(task.model.parameters(), lr=0.5)
    graft = Graft(adam, sgd, names=task.model)
    seen = []
    config = TrainConfig(steps=8, schedule="step", warmup=0, milestones=[0.5], eval_every=0, log_every=4)
    fit(config, task, graft, schedule_owner=adam, on_step=lambda s, loss: seen.append((s, loss)), progress=False)
    assert [s for s, _ in seen] == list(range(8))
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad for _, loss in seen)
    assert adam.param_groups[0]["lr"] == pytest.approx(0.001)  # x0.1 after half the run
    assert sgd.param_groups[0]["lr"] == 0.5  # D's lr is untouched
    assert graft.steps == 8


def test_lr_factor_per_group_and_global():
    task = ToyTask()
    opt = make_optimizer("sgd", [{"params": [task.model.weight]}, {"params": [task.model.bias], "lr": 0.2}], 0.1)
    config = TrainConfig(steps=4, schedule="constant", warmup=0, eval_every=0)
    half_later = lambda s: 1.0 if s < 2 else 0.5  # noqa: E731
    result = fit(config, task, opt, schedule_owner=opt, lr_factor=[lambda s: 1.0, half_later], progress=False)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.1])  # after the last step (factor at 4)
    assert result.metrics["lr"].tolist() == pytest.approx([0.1] * 4)
    task2 = ToyTask()
    opt2 = make_optimizer("sgd", task2.model.parameters(), 0.1)
    result = fit(config, task2, opt2, schedule_owner=opt2, lr_factor=half_later, progress=False)
    assert result.metrics["lr"].tolist() == pytest.approx([0.1, 0.1, 0.05, 0.05])
    with pytest.raises(GraftlabError, match="param groups"):
        fit(config, task2, opt2, schedule_owner=opt2, lr_factor=[half_later] * 3, progress=False)


def test_divergence_stops_the_run_at_the_first_non_finite_step():
    result, _ = toy_fit(lr=1e3, schedule="constant", warmup=0, steps=200, eval_every=0)
    losses = result.metrics["loss"].to_numpy()
    first_bad = int(np.flatnonzero(~np.isfinite(losses))[0])
    # on CPU the flag is read the same step: the run stops on the first non-finite step itself
    assert result.diverged_at == first_bad == result.steps - 1 and len(losses) == result.steps
    assert np.isfinite(losses[:first_bad]).all()


def test_steps_from_epochs_and_defaults():
    task = ToyTask()
    assert total_steps(TrainConfig(epochs=2.5), task) == 20
    assert total_steps(TrainConfig(), task) == 300
    with pytest.raises(GraftlabError, match="either steps or epochs"):
        total_steps(TrainConfig(steps=3, epochs=1), task)
    with pytest.raises(GraftlabError):
        total_steps(TrainConfig(steps=0), task)
    cfg = resolve_config(TrainConfig(optimizer="sgd", epochs=1), task)
    assert (cfg.steps, cfg.epochs, cfg.schedule, cfg.warmup) == (8, None, "poly", 0.0)


# --- real tasks -------------------------------------------------------------------------------------

def real_fit(task_name, steps, eval_size=32, **cfg):
    config = TrainConfig(task=task_name, steps=steps, eval_every=0, log_every=steps, batch_size=16, device="cpu", **cfg)
    task = get_task(task_name, size="tiny", batch_size=16, seed=config.seed, device="cpu", eval_size=eval_size)
    config = resolve_config(config, task)
    opt = make_optimizer(config.optimizer, task.model.parameters(), config.lr, **config.hparams)
    before = task.evaluate(task.model)
    return fit(config, task, opt, schedule_owner=opt, progress=False), before


def test_same_config_twice_gives_identical_runs():
    a, _ = real_fit("bert", 4, optimizer="sgd", lr=0.5, hparams={"momentum": 0.9})
    b, _ = real_fit("bert", 4, optimizer="sgd", lr=0.5, hparams={"momentum": 0.9})
    assert a.metrics["loss"].tolist() == b.metrics["loss"].tolist()
    assert a.final == b.final
    c, _ = real_fit("bert", 4, optimizer="sgd", lr=0.5, hparams={"momentum": 0.9}, seed=1)
    assert c.metrics["loss"].tolist() != a.metrics["loss"].tolist()


def test_a_short_fit_lowers_the_loss_bert():
    result, before = real_fit("bert", 16, optimizer="adam", lr=3e-3, schedule="constant", warmup=0)
    losses = result.metrics["loss"].to_numpy()
    assert losses[-4:].mean() < losses[:4].mean() - 0.5
    assert result.final["loss"] < before["loss"] - 0.5
    assert result.steps_per_second > 0


def test_a_short_fit_lowers_the_loss_resnet():
    # BatchNorm's running statistics lag the weights early on, so the held-out check is accuracy.
    result, before = real_fit("resnet", 20, eval_size=256, optimizer="adam", lr=1e-3, schedule="constant", warmup=0)
    losses = result.metrics["loss"].to_numpy()
    assert losses[-4:].mean() < losses[:4].mean() - 0.2
    assert result.final["accuracy"] > before["accuracy"] + 0.1


# --- the plain trainer ------------------------------------------------------------------------------

def corrections_file(path, multipliers=None, schedule=None):
    data = {"format": "graftlab.corrections/1", "source": {"direction_lr": 0.1}}
    if multipliers:
        data["multipliers"] = multipliers
    if schedule:
        data["schedule"] = schedule
    path.write_text(json.dumps(data))
    return path


def small_train_config(**kw):
    return TrainConfig(**{"task": "resnet", "steps": 3, "eval_every": 0, "eval_size": 16, "batch_size": 8,
                          "device": "cpu", "optimizer": "sgd", "lr": 0.1, "schedule": "constant", "warmup": 0, **kw})


def test_train_with_static_multipliers(tmp_path):
    names = [n for n, _ in get_task("resnet", batch_size=8, device="cpu", eval_size=16).model.named_parameters()]
    mult = {n: (10.0 if "conv" in n else 0.5) for n in names}
    corr = corrections_file(tmp_path / "c.json", multipliers=mult)
    out = tmp_path / "m.parquet"
    result = train(small_train_config(metrics=str(out)), corrections=corr, progress=False)
    groups = result.optimizer.param_groups
    assert [g["name"] for g in groups] == names
    assert [g["lr"] for g in groups] == pytest.approx([0.1 * mult[n] for n in names])
    meta = read_metrics(out)[1]
    assert meta["corrections"]["missing"] == [] and meta["optimizer"]["lr_max"] == pytest.approx(1.0)

    partial = corrections_file(tmp_path / "p.json", multipliers={names[0]: 2.0})
    with pytest.raises(GraftlabError, match="allow_missing=True"):
        train(small_train_config(), corrections=partial, progress=False)
    result = train(small_train_config(), corrections=partial, allow_missing=True, progress=False)
    assert [g["lr"] for g in result.optimizer.param_groups[:2]] == pytest.approx([0.2, 0.1])


def test_train_follows_a_global_schedule(tmp_path):
    corr = corrections_file(tmp_path / "s.json", schedule={"global": [[0, 1.0], [2, 0.5], [4, 0.25]]})
    result = train(small_train_config(optimizer="adagrad", steps=6, lr=0.05), corrections=corr, progress=False)
    assert result.metrics["lr"].tolist() == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125])


def test_train_baseline_refuses_bad_configs_before_building(tmp_path, monkeypatch):
    import graftlab.runs.run as run_module

    def no_task(*args, **kwargs):
        raise AssertionError("the task was built before the config was checked")

    monkeypatch.setattr(run_module, "get_task", no_task)
    out = tmp_path / "m.parquet"
    out.write_text("x")
    for bad, match in [
        (dict(metrics=str(out)), "already exists"),
        (dict(task="nonexistent"), "task must be one of bert, gpt, resnet"),
        (dict(optimizer="lbfgs"), "optimizer must be one of sgd"),
        (dict(hparams={"betas": (0.9, 0.99)}), "no hyperparameter"),
        (dict(hparams={"momentum": -1.0}), "momentum"),
        (dict(schedule="nope"), "schedule must be one of constant"),
        (dict(threads=0), "threads"),
        (dict(resume=True), "resume=True needs checkpoint_dir"),
        (dict(checkpoint_every=5), "checkpoint_every needs checkpoint_dir"),
        (dict(metrics=str(out / "m.parquet")), "is a file"),
        (dict(warmup=3), "warmup"),
        (dict(log_every=0), "log_every"),
    ]:
        with pytest.raises(GraftlabError, match=match):
            train(small_train_config(**bad), progress=False)
    assert out.read_text() == "x"


# --- configs ----------------------------------------------------------------------------------------

def test_load_config_yaml_and_toml(tmp_path):
    (tmp_path / "c.yaml").write_text("task: resnet\nsteps: 50\nlr: 0.1\nhparams: {momentum: 0.9, betas: [0.9, 0.98]}\n"
                                     "milestones: [0.3, 0.6]\nwarmup: 5\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.task, cfg.steps, cfg.lr, cfg.warmup, cfg.milestones) == ("resnet", 50, 0.1, 5.0, [0.3, 0.6])
    assert cfg.hparams == {"momentum": 0.9, "betas": (0.9, 0.98)}
    (tmp_path / "c.toml").write_text('task = "bert"\noptimizer = "sgd"\nhparams = ["momentum=0.9", "nesterov=true"]\n')
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.optimizer == "sgd" and cfg.hparams == {"momentum": 0.9, "nesterov": True}


@pytest.mark.parametrize(
    "name,text,match",
    [("c.yaml", "stepz: 3\n", "unknown config key"), ("c.yaml", "steps: many\n", "steps"),
     ("c.yaml", "- 1\n- 2\n", "mapping"), ("c.toml", "steps = \n", "cannot parse"), ("c.json", "{}", ".toml")],
)
def test_bad_config_files(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(GraftlabError, match=match):
        load_config(tmp_path / name)


def test_make_config_layers_command_line_over_file(tmp_path):
    (tmp_path / "c.yaml").write_text("task: resnet\nsteps: 50\nhparams: {momentum: 0.9}\n")
    cfg = make_config(tmp_path / "c.yaml", steps=7, lr=None, hparams=["nesterov=true"])
    assert (cfg.task, cfg.steps, cfg.lr) == ("resnet", 7, None)
    assert cfg.hparams == {"momentum": 0.9, "nesterov": True}
    assert make_config(None, task="bert").steps is None


def test_train_and_record_configs_share_the_run_fields(tmp_path):
    import dataclasses

    from graftlab.runs import RecordConfig, RunConfig

    run = [f.name for f in dataclasses.fields(RunConfig)]
    assert len(run) == 25 and {"steps", "schedule", "checkpoint_dir", "metrics", "threads"} <= set(run)
    for cls in (TrainConfig, RecordConfig):
        own = [f.name for f in dataclasses.fields(cls)]
        assert own[: len(run)] == run and issubclass(cls, RunConfig)
    (tmp_path / "r.yaml").write_text("m_hparams: {betas: [0.9, 0.98]}\nd_hparams: {momentum: 0.9}\n")
    cfg = make_config(tmp_path / "r.yaml", RecordConfig, m_hparams=["eps=1e-6"], d_hparams=None, steps=5)
    assert cfg.m_hparams == {"betas": (0.9, 0.98), "eps": 1e-6} and cfg.d_hparams == {"momentum": 0.9}
    cfg.validate(outputs=False)
    with pytest.raises(GraftlabError, match="out is required"):
        cfg.validate()


def test_resolve_fills_task_defaults_and_checks_the_schedule():
    from graftlab.runs import RecordConfig

    task = ToyTask()
    rec = RecordConfig(magnitude="adam", direction="sgd", direction_lr=0.3, steps=10).resolve(task)
    assert (rec.magnitude_lr, rec.direction_lr, rec.schedule, rec.warmup) == (1e-3, 0.3, "poly", 0.0)
    with pytest.raises(GraftlabError, match="warmup"):
        TrainConfig(epochs=0.5, warmup=4).resolve(task)  # 4 steps: the warmup is the whole run


def test_cli_train_and_refusal(tmp_path):
    from typer.testing import CliRunner

    from graftlab.cli.app import app

    (tmp_path / "c.yaml").write_text("eval_size: 16\neval_every: 0\nbatch_size: 8\n")
    out = tmp_path / "m.parquet"
    args = ["train", "--task", "resnet", "--optimizer", "sgd", "--lr", "0.05", "--hparam", "momentum=0.9",
            "--steps", "2", "--device", "cpu", "--config", str(tmp_path / "c.yaml"), "--metrics", str(out), "--quiet"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert "held-out accuracy" in run.output and out.exists()
    meta = read_metrics(out)[1]
    assert meta["config"]["hparams"] == {"momentum": 0.9} and meta["config"]["batch_size"] == 8
    # The installed entry point turns the error into one line and exit code 2, leaving the file alone.
    before = out.read_bytes()
    again = subprocess.run([sys.executable, "-m", "graftlab.cli.app", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().startswith("error:") and "already exists" in again.stderr
    assert "Traceback" not in again.stderr and out.read_bytes() == before


def test_threads_setting():
    """``threads`` sets torch's thread count (this module runs at 1, so start elsewhere), None
    leaves it as it is, and 0 is refused."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        toy_fit(threads=1, steps=2, eval_every=0)
        assert torch.get_num_threads() == 1
        toy_fit(threads=2, steps=2, eval_every=0)
        assert torch.get_num_threads() == 2
        toy_fit(threads=None, steps=2, eval_every=0)
        assert torch.get_num_threads() == 2
        with pytest.raises(GraftlabError, match="threads"):
            toy_fit(threads=0, steps=2)
    finally:
        torch.set_num_threads(before)


def test_correction_notes_warn_about_base_lr_and_double_schedules():
    from graftlab.corrections import Corrections
    from graftlab.runs.run import _correction_notes

    sched = Corrections(schedule={"global": [[0, 0.1], [50, 0.2]]}, source={"direction_lr": 0.05})
    notes = _correction_notes(sched, TrainConfig(lr=0.1, schedule="step"))
    assert len(notes) == 2
    assert "relative to lr 0.05" in notes[0] and "base lr is 0.1" in notes[0]
    assert "a constant schedule without warmup follows them alone" in notes[1]
    assert len(_correction_notes(sched, TrainConfig(lr=0.05, schedule="constant", warmup=0.0))) == 0
    static = Corrections(multipliers={"fc.weight": 10.0}, source={"direction_lr": 0.1})
    assert _correction_notes(static, TrainConfig(lr=0.1, schedule="poly")) == []


def test_cli_train_takes_the_step_schedule_options(tmp_path):
    from typer.testing import CliRunner

    from graftlab.cli.app import app

    out = tmp_path / "m.parquet"
    res = CliRunner().invoke(app, ["train", "--task", "resnet", "--optimizer", "sgd", "--lr", "0.1", "--steps", "8",
                                   "--schedule", "step", "--milestones", "0.25,0.5", "--gamma", "0.5", "--warmup", "0",
                                   "--eval-every", "0", "--metrics", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    assert pd.read_parquet(out)["lr"].round(6).tolist() == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.025, 0.025]


def test_corrections_choose_ds_optimizer_and_refuse_another(tmp_path, capfd):
    names = [n for n, _ in get_task("resnet", batch_size=8, device="cpu", eval_size=16).model.named_parameters()]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "format": "graftlab.corrections/1", "multipliers": {n: 2.0 for n in names},
        "source": {"direction_lr": 0.05, "metadata": {
            "direction": {"class": "torch.optim.sgd.SGD", "hyperparameters": {"lr": 0.05, "momentum": 0.9}},
            "config": {"direction": "sgd", "d_hparams": {"momentum": 0.9}}}}}))
    from graftlab.corrections import load_corrections
    assert load_corrections(path).direction_optimizer == "sgd"

    # nothing said: D's optimizer, lr and hyperparameters
    result = train(small_train_config(optimizer=None, lr=None), corrections=path, progress=False)
    assert isinstance(result.optimizer, torch.optim.SGD)
    assert [g["lr"] for g in result.optimizer.param_groups] == pytest.approx([0.1] * len(names))
    assert result.optimizer.defaults["momentum"] == 0.9

    with pytest.raises(GraftlabError, match="distilled for D=sgd, not optimizer=adam.*allow_other_optimizer=True"):
        train(small_train_config(optimizer="adam"), corrections=path, progress=False)
    capfd.readouterr()
    result = train(small_train_config(optimizer="adam", lr=0.05), corrections=path, allow_other_optimizer=True,
                   progress=False)  # no progress bar: the warning still goes to stderr
    assert isinstance(result.optimizer, torch.optim.Adam)
    assert "distilled for D=sgd; this run trains adam" in capfd.readouterr().err


@pytest.mark.parametrize("metadata", [{"config": "sgd"}, {"direction": "sgd"}, {"config": {"direction": 3}}, "sgd"])
def test_a_file_whose_recorded_run_is_not_objects_does_not_say_ds_optimizer(tmp_path, metadata):
    from graftlab.corrections import load_corrections

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": "graftlab.corrections/1", "multipliers": {"conv1.weight": 2.0},
                                "source": {"metadata": metadata} if isinstance(metadata, dict) else {}}))
    assert load_corrections(path).direction_optimizer is None
    result = train(small_train_config(), corrections=path, allow_missing=True, progress=False)
    assert isinstance(result.optimizer, torch.optim.SGD)


def test_a_file_that_does_not_say_ds_optimizer_says_so_and_which_one_runs(tmp_path, capfd):
    path = corrections_file(tmp_path / "c.json", multipliers={"conv1.weight": 2.0})
    capfd.readouterr()
    train(small_train_config(optimizer=None, lr=None), corrections=path, allow_missing=True, progress=False)
    assert "the file does not say which optimizer D was; this run trains adam" in capfd.readouterr().err


@pytest.mark.parametrize("config, key", [({"direction": "lion"}, "source.metadata.config.direction must be one of"),
                                         ({"direction": "sgd", "d_hparams": {"momentum": "lots"}},
                                          "source.metadata.config.d_hparams: sgd hyperparameter momentum")])
def test_a_recorded_run_this_trainer_cannot_run_names_the_files_key(tmp_path, config, key):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": "graftlab.corrections/1", "multipliers": {"conv1.weight": 2.0},
                                "source": {"metadata": {"config": config}}}))
    with pytest.raises(GraftlabError, match=f"{path}: the corrections file's recorded run does not fit") as err:
        train(small_train_config(optimizer=None, lr=None), corrections=path, allow_missing=True, progress=False)
    assert key in str(err.value) and "pass optimizer" in str(err.value)
    res = CliRunner().invoke(app, ["train", "--task", "resnet", "--corrections", str(path), "--allow-missing",
                                   "--steps", "1", "--threads", "1"])
    assert res.exit_code != 0 and key in str(res.exception) and "pass --optimizer" in str(res.exception)


def test_train_cli_says_the_other_optimizer_flag(tmp_path):
    names = [n for n, _ in get_task("resnet", batch_size=8, device="cpu", eval_size=16).model.named_parameters()]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": "graftlab.corrections/1", "multipliers": {n: 2.0 for n in names},
                                "source": {"direction_lr": 0.05, "metadata": {"config": {"direction": "sgd"}}}}))
    res = CliRunner().invoke(app, ["train", "--task", "resnet", "--optimizer", "adam", "--corrections", str(path),
                                   "--steps", "2"])
    assert res.exit_code != 0 and "--allow-other-optimizer" in str(res.exception)


# --- one definition of each setting ----------------------------------------------------------------


@pytest.mark.parametrize("command,cls", [("record", "RecordConfig"), ("train", "TrainConfig")])
def test_run_options_are_the_config_fields(command, cls):
    """Each field with a flag is exactly one option of its command, with that field's help; the
    command adds only its own few (config, overwrite, quiet, and train's corrections flags)."""
    import typer

    import graftlab.runs.config as config
    from graftlab.cli.app import app
    from graftlab.runs.fields import settings

    cls = getattr(config, cls)
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params if p.name != "help"}
    fields = {name: s for name, s in settings(cls).items() if s.flag is not None}
    assert set(fields) <= set(params)
    own = set(params) - set(fields)
    assert own <= {"config", "overwrite", "quiet", "corrections", "allow_missing", "allow_other_optimizer", "out"}, own
    for name, s in fields.items():
        assert s.flag in params[name].opts and params[name].help.startswith(s.help), name


def test_a_new_field_is_a_new_option_of_both_commands():
    """Adding a setting is one edit: a field declared with ``setting`` becomes a checked option."""
    import dataclasses
    from typing import Optional

    import typer

    from graftlab.cli import options
    from graftlab.runs import make_config
    from graftlab.runs.config import RecordConfig
    from graftlab.runs.fields import setting

    @dataclasses.dataclass
    class Wider(RecordConfig):
        row_block: Optional[int] = setting(None, "Rows per block.", ge=1, le=4096)

    seen = {}

    @options.run_options(Wider)
    def wider(values: dict) -> None:
        seen.update(values)

    app = typer.Typer()
    app.command()(wider)
    from typer.testing import CliRunner

    assert CliRunner().invoke(app, ["--row-block", "8", "--task", "gpt"]).exit_code == 0
    assert seen == {"row_block": 8, "task": "gpt"}
    with pytest.raises(GraftlabError, match=r"row_block must be <= 4096, got 5000"):
        make_config(None, Wider, row_block=5000).validate(outputs=False)


@pytest.mark.parametrize("text,says", [
    ("steps: true\n", "config key 'steps' must be a whole number, got True"),
    ("magnitude_lr: true\n", "config key 'magnitude_lr' must be a finite number, got True"),
    ("out: [a, b]\n", "config key 'out' must be a path (text), got ['a', 'b']"),
    ("steps: 1.0e+23\n", "config key 'steps' must be a whole number"),
    ("steps: 10000000000\n", "config key 'steps' must be <= 1000000000"),
    ("granularity: rows\n", "config key 'granularity' must be one of layer, global, coordinate, head, vocab, got 'rows'"),
    ("d_hparams: {momentum: true}\n", "sgd hyperparameter momentum must be a finite number, got True"),
    ("batch_size:\n", "config key 'batch_size' cannot be empty"),
])
def test_config_file_values_are_checked_against_their_schema(tmp_path, text, says):
    from graftlab.runs import RecordConfig, load_config

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(GraftlabError) as info:
        load_config(path, RecordConfig).validate(outputs=False)
    assert says in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("given,says,param", [
    (dict(milestones="0.5,0.5"), "milestones must be increasing fractions in (0, 1), got [0.5, 0.5]", "milestones"),
    (dict(direction="adam", d_hparams=["amsgrad=2"]), "adam hyperparameter amsgrad must be true or false, got 2",
     "d_hparams"),
    (dict(steps=10**23), "steps must be <= 1000000000", "steps"),
    (dict(flush_every=10**11), "flush_every must be <= 1000000", "flush_every"),
    (dict(every=0), "every must be >= 1, got 0", "every"),
    (dict(magnitude_lr=float("nan")), "magnitude_lr must be a finite number, got nan", "magnitude_lr"),
])
def test_make_config_errors_name_their_parameter(given, says, param):
    from graftlab.runs import RecordConfig, make_config

    with pytest.raises(GraftlabError) as info:
        make_config(None, RecordConfig, **given).validate(outputs=False)
    assert says in str(info.value) and param in info.value.params


def test_setting_choices_match_the_modules_that_define_them():
    """config.py lists the choices without importing torch; they are the defining modules' own."""
    import graftlab.runs.config as config
    from graftlab import tasks
    from graftlab.distributed.env import MODES
    from graftlab.graft.optimizers import OPTIMIZERS
    from graftlab.graft.partition import GRANULARITIES
    from graftlab.record.recorder import DEFAULT_FLUSH_EVERY, MAX_FLUSH_EVERY

    assert config.TASKS == tasks.TASKS and config.SIZES == tasks.SIZES and config.MODES == MODES
    assert config.OPTIMIZERS == tuple(OPTIMIZERS)
    assert set(GRANULARITIES) <= set(config.GRANULARITIES)
    assert (config.DEFAULT_FLUSH_EVERY, config.MAX_FLUSH) == (DEFAULT_FLUSH_EVERY, MAX_FLUSH_EVERY)
