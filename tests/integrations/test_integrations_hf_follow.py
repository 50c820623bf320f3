"""The HF Trainer with a Graft built before the Trainer takes the model: schedule-free M (the Trainer
calls optimizer.train()/eval()), the loss first logged after parts were written, a move to CUDA."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import graftlab

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from graftlab.integrations import hf  # noqa: E402
from tests.integrations.test_integrations_hf import SGD, dataset, tiny_bert, training_args  # noqa: E402

torch.set_num_threads(1)


def test_schedule_free_adamw_as_m_trains_and_every_part_holds_the_loss(tmp_path):
    pytest.importorskip("schedulefree")
    model = tiny_bert()
    args = training_args(tmp_path / "out", optim="schedule_free_adamw", lr_scheduler_type="constant",
                         warmup_steps=0, logging_steps=4)
    graft = hf.graft_optimizer(model, args, direction=SGD)
    assert type(graft.magnitude).__name__ == "AdamWScheduleFree"
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(graft, None),
                                   callbacks=[hf.RecorderCallback(tmp_path / "trace", flush_every=2)])
    trainer.train()
    assert graft.steps == 8
    # the Trainer put the schedule-free M in train mode through the Graft, and back in eval at the end
    assert "train_mode" in graft.magnitude.param_groups[0]
    logged = {h["step"] - 1: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert sorted(logged) == [3, 7]
    # read as the README reads a trace folder: the loss first logged in the second part is kept
    df = pd.read_parquet(tmp_path / "trace")
    got = df.dropna(subset=["loss"]).groupby("step").loss.first().to_dict()
    assert got == pytest.approx(logged)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_moves_the_model_to_cuda_after_the_graft_was_built(tmp_path):
    model = tiny_bert()
    args = training_args(tmp_path / "out", use_cpu=False)
    graft = hf.graft_optimizer(model, args, direction=SGD)  # built on CPU tensors
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(graft, None),
                                   callbacks=[hf.RecorderCallback(tmp_path / "trace")])
    trainer.train()
    assert graft.last_stats.device.type == "cuda" and graft.steps == 8
    df = graftlab.read_trace(tmp_path / "trace")
    assert df.step.nunique() == 8 and df.ratio.notna().all()


def test_accumulated_step_loss_is_what_the_trainer_logs(tmp_path):
    model = tiny_bert()
    args = training_args(tmp_path / "out", gradient_accumulation_steps=2, logging_steps=1, max_steps=4)
    graft = hf.graft_optimizer(model, args, direction=SGD)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(graft, None),
                                   callbacks=[hf.RecorderCallback(tmp_path / "trace")])
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    got = graftlab.read_trace(tmp_path / "trace").groupby("step")["loss"].first()
    assert graft.steps == 4 and len(logged) == 4
    np.testing.assert_allclose(got.to_numpy(), logged, rtol=1e-6)
