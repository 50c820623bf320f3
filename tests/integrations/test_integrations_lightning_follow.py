"""Under gradient accumulation the trace's loss for a step is the one Lightning itself logs for it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graftlab

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402

from graftlab.integrations.lightning import RecorderCallback  # noqa: E402
from tests.integrations.test_integrations_lightning import Module, loader, trainer  # noqa: E402


class Logged(Module):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss


class Logs(pl.loggers.logger.Logger):
    """Keeps what Lightning hands its loggers."""

    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "memory", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass


def test_accumulated_step_loss_is_what_lightning_logs(tmp_path):
    torch.set_num_threads(1)
    logs = Logs()
    run = trainer(tmp_path, [RecorderCallback(tmp_path / "pl")], max_steps=3, accumulate_grad_batches=2,
                  logger=logs, log_every_n_steps=1)
    run.fit(Logged(), loader(6))
    lightning_logged = [m["train_loss"] for _, m in logs.rows if "train_loss" in m]
    got = graftlab.read_trace(tmp_path / "pl").groupby("step")["loss"].first()
    assert len(lightning_logged) == 3
    np.testing.assert_allclose(got.to_numpy(), lightning_logged, rtol=1e-6)
