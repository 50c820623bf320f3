"""PyTorch Lightning: a real pl.Trainer on CPU with configure_optimizers returning a Graft (and a
scheduler on it) records the same trace as the plain loop it stands for."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graftlab
from graftlab.errors import GraftlabError
from tests import models

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402

from graftlab.integrations.lightning import RecorderCallback  # noqa: E402

STEPS = 8
BATCHES = 4  # per epoch: STEPS spans two epochs, and a checkpoint at an epoch's end resumes exactly


def warmup(t):
    return min(1.0, (t + 1) / 4)


def data(n=BATCHES):
    return models.batches("block", n, dtype=torch.float32)


class Module(pl.LightningModule):
    def __init__(self, scheduler=True, grafts=1):
        super().__init__()
        self.net = models.make("block", dtype=torch.float32)
        self.scheduler, self.grafts = scheduler, grafts

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self):
        if self.grafts == 0:
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        graft = graftlab.Graft(torch.optim.Adam(self.parameters(), lr=1e-2),
                               torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9), names=self)
        if not self.scheduler:
            return graft
        sched = torch.optim.lr_scheduler.LambdaLR(graft, warmup)
        return {"optimizer": graft, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(root, callbacks, max_steps=STEPS, **kw):
    base = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
                callbacks=callbacks)
    base.update(kw)
    return pl.Trainer(**base)


def loader(n=BATCHES):
    return torch.utils.data.DataLoader(data(n), batch_size=None)


def plain_loop(path, accumulate=1, n=BATCHES, steps=STEPS):
    """What the LightningModule stands for, written as a plain loop."""
    torch.set_num_threads(1)
    net = models.make("block", dtype=torch.float32)
    graft = graftlab.Graft(torch.optim.Adam(net.parameters(), lr=1e-2),
                           torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                           names=[("net." + k, p) for k, p in net.named_parameters()])
    sched = torch.optim.lr_scheduler.LambdaLR(graft, warmup)
    with graftlab.Recorder(graft, path, model=net) as rec:
        for i, (x, y) in enumerate((data(n) * steps)[: steps * accumulate]):
            loss = (net(x) - y).pow(2).mean()
            (loss / accumulate).backward()
            if (i + 1) % accumulate == 0:
                graft.step()
                graft.zero_grad()
                sched.step()
                rec.log(loss=loss.detach())
    return graftlab.read_trace(path)


def test_lightning_run_records_the_plain_loop_trace(tmp_path):
    torch.set_num_threads(1)
    module = Module()
    trainer(tmp_path, [RecorderCallback(tmp_path / "pl")]).fit(module, loader())
    got, want = graftlab.read_trace(tmp_path / "pl"), plain_loop(tmp_path / "plain")
    assert list(got.step.unique()) == list(range(STEPS))
    assert list(got.group.unique()) == [f"net.{n}" for n, _ in module.net.named_parameters()]
    for col in ("norm_m", "norm_d", "ratio", "lr", "loss"):
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    # the scheduler on the Graft moved M's lr: the warmup is in the trace
    np.testing.assert_allclose(got.groupby("step")["lr"].first(), [1e-2 * warmup(t) for t in range(STEPS)])
    meta = got.attrs["graftlab"]
    assert meta["task"] == "Module" and meta["config"]["lightning"]["max_steps"] == STEPS


def test_gradient_accumulation_records_each_optimizer_step_once(tmp_path):
    torch.set_num_threads(1)
    trainer(tmp_path, [RecorderCallback(tmp_path / "pl")], max_steps=3, accumulate_grad_batches=2).fit(Module(), loader(6))
    got, want = graftlab.read_trace(tmp_path / "pl"), plain_loop(tmp_path / "plain", accumulate=2, n=6, steps=3)
    assert list(got.step.unique()) == [0, 1, 2]
    for col in ("ratio", "lr", "loss"):
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=1e-6, err_msg=col)


@pytest.mark.slow
def test_fit_resumed_from_a_checkpoint_appends_to_the_trace(tmp_path):
    torch.set_num_threads(1)
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=BATCHES, save_top_k=-1)
    trainer(tmp_path, [RecorderCallback(tmp_path / "pl"), ckpt], max_steps=STEPS - 2, enable_checkpointing=True).fit(
        Module(), loader())
    path = tmp_path / "ckpt" / f"epoch=0-step={BATCHES}.ckpt"
    assert path.exists() and len(graftlab.read_trace(tmp_path / "pl").step.unique()) == STEPS - 2
    # the run "died" after step 5; the trace holds steps the resumed fit redoes from its checkpoint
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=BATCHES, save_top_k=-1)
    trainer(tmp_path, [RecorderCallback(tmp_path / "pl"), ckpt], enable_checkpointing=True).fit(
        Module(), loader(), ckpt_path=str(path))
    got, want = graftlab.read_trace(tmp_path / "pl"), plain_loop(tmp_path / "plain")
    assert list(got.step.unique()) == list(range(STEPS))
    for col in ("ratio", "lr"):
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=1e-6, err_msg=col)


@pytest.mark.parametrize("grafts", [0])
def test_callback_needs_exactly_one_graft(tmp_path, grafts):
    with pytest.raises(GraftlabError, match="exactly one graftlab.Graft"):
        trainer(tmp_path, [RecorderCallback(tmp_path / "pl")], max_steps=1).fit(Module(grafts=grafts), loader(1))
    assert not (tmp_path / "pl").exists()


def test_recorder_finds_the_graft_inside_lightnings_own_wrappers(tmp_path):
    """The optimizer objects Lightning hands around are wrappers: LightningOptimizer (what
    ``self.optimizers()`` returns in a LightningModule; a Graft subclass holding a copy of the
    Graft's attributes, which goes stale when the Graft rebuilds them) and the Fabric optimizer
    from ``fabric.setup``. A Recorder given either records the Graft inside (it took Lightning's
    copy for the Graft before): its rows are the Graft's own ``last_stats`` of each step."""
    from lightning.fabric import Fabric
    from lightning.pytorch.core.optimizer import LightningOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(model.parameters(), lr=0.1),
                           names=model)
    fabric = Fabric(accelerator="cpu", devices=1)
    fab_model, fab_opt = fabric.setup(model, graft)
    # a LightningOptimizer steps through its Trainer's strategy, which ends in the Graft's step
    wrappers = {"lightning": (LightningOptimizer(graft), graft.step), "fabric": (fab_opt, fab_opt.step)}
    for name, (wrapper, step) in wrappers.items():
        assert wrapper is not graft
        stats, start = [], graft.steps  # a Recorder numbers rows from the Graft's step count
        with graftlab.Recorder(wrapper, tmp_path / name, model=model) as rec:
            assert rec.graft is graft, name
            for _ in range(3):
                graft.zero_grad()
                fabric.backward(fab_model(torch.randn(8, 4)).pow(2).mean())
                step()
                stats.append(graft.last_stats[2].clone())
        df = graftlab.read_trace(tmp_path / name)
        assert df["step"].tolist() == [start + s for s in range(3) for _ in graft.group_names], name
        np.testing.assert_array_equal(df["ratio"].to_numpy(), torch.cat(stats).numpy(), err_msg=name)
    with pytest.raises(GraftlabError, match="needs a graftlab.Graft"):
        graftlab.Recorder(LightningOptimizer(graft.magnitude), tmp_path / "x")
    assert not (tmp_path / "x").exists()
