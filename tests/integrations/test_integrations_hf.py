"""Hugging Face Trainer and accelerate: a real Trainer on a tiny BERT (built from a config, nothing
downloaded) grafts, schedules M's lr, records, checkpoints and resumes."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import graftlab
from graftlab.errors import GraftlabError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from graftlab.integrations import hf  # noqa: E402

STEPS = 8
SGD = functools.partial(torch.optim.SGD, lr=0.1)


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    return transformers.BertForMaskedLM(cfg)


def dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (n, 8), generator=g)
    return [{"input_ids": x, "labels": x} for x in ids]


def training_args(out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-3,
                logging_steps=2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                lr_scheduler_type="linear", warmup_steps=2, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_graft_optimizer_builds_m_as_the_trainer_builds_its_own(tmp_path):
    model = tiny_bert()
    args = training_args(tmp_path, weight_decay=0.01, adam_beta2=0.98)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset())
    own = trainer.create_optimizer()
    graft = hf.graft_optimizer(model, args, direction=SGD)
    m = graft.magnitude
    assert type(m) is type(own)
    assert len(m.param_groups) == len(own.param_groups) == 2
    for mine, theirs in zip(m.param_groups, own.param_groups):
        assert [id(p) for p in mine["params"]] == [id(p) for p in theirs["params"]]
        assert {k: v for k, v in mine.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}
    assert m.param_groups[0]["weight_decay"] == 0.01 and m.param_groups[1]["weight_decay"] == 0.0
    assert isinstance(graft.direction, torch.optim.SGD) and graft.direction.defaults["lr"] == 0.1
    assert set(graft.group_names) == {n for n, _ in model.named_parameters()}
    with pytest.raises(GraftlabError, match="torch.optim.Optimizer"):
        hf.graft_optimizer(model, args, direction=lambda params: "sgd")


def train(out, trace, resume=None, **kw):
    model = tiny_bert()
    args = training_args(out, **kw)
    graft = hf.graft_optimizer(model, args, direction=SGD)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(graft, None),
                                   callbacks=[hf.RecorderCallback(trace)])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, graft


def test_trainer_records_a_full_trace_and_its_schedule_moves_m_lr(tmp_path):
    trainer, graft = train(tmp_path / "out", tmp_path / "trace")
    df = graftlab.read_trace(tmp_path / "trace")
    names = list(graft.group_names)
    assert graft.steps == STEPS and trainer.state.global_step == STEPS
    assert list(df.step.unique()) == list(range(STEPS)) and len(df) == STEPS * len(names)
    assert list(df.group[: len(names)]) == names
    per_step = df.groupby("step").first()
    # the Trainer's linear schedule with 2 warmup steps, built on the Graft, drove M's lr
    ref = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = transformers.get_linear_schedule_with_warmup(ref, 2, STEPS)
    want = []
    for _ in range(STEPS):
        want.append(ref.param_groups[0]["lr"])
        ref.step()
        sched.step()
    np.testing.assert_allclose(per_step["lr"].to_numpy(), want, rtol=1e-12)
    assert graft.magnitude.param_groups[0]["lr"] == pytest.approx(0.0)
    assert graft.direction.param_groups[0]["lr"] == 0.1  # D keeps its own lr
    # at logging steps, the Trainer's own logged loss, grad norm and lr
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 6, 8]
    np.testing.assert_allclose(per_step["loss"].to_numpy()[1::2], [h["loss"] for h in logs], rtol=1e-6)
    np.testing.assert_allclose(per_step["grad_norm"].to_numpy()[1::2], [h["grad_norm"] for h in logs], rtol=1e-6)
    np.testing.assert_allclose(per_step["lr"].to_numpy()[1::2], [h["learning_rate"] for h in logs], rtol=1e-12)
    assert per_step["loss"].iloc[0::2].isna().all()
    # HF's warmup starts at lr 0: the first step took no step at all (M's is zero), later ones did
    first = df[df.step == 0]
    assert (first.norm_m == 0).all() and (first.ratio[first.norm_d > 0] == 0).all()
    later = df[df.step > 0].ratio.to_numpy()
    assert np.isfinite(later).mean() > 0.9 and (later[np.isfinite(later)] > 0).all()
    meta = df.attrs["graftlab"]
    assert meta["task"] == "BertForMaskedLM" and meta["batch_size"] == 8 and meta["seed"] == 0
    assert meta["config"]["trainer"]["lr_scheduler_type"] == "linear"
    assert {g["kind"] for g in meta["groups"]} >= {"Q", "K", "V", "ffn", "embedding", "norm"}


@pytest.mark.slow
def test_resumed_trainer_appends_and_matches_an_uninterrupted_run(tmp_path):
    train(tmp_path / "a", tmp_path / "whole")
    train(tmp_path / "b", tmp_path / "resumed", save_strategy="steps", save_steps=3)
    trace = tmp_path / "resumed"
    # the run died after its checkpoint at step 3 but after flushing steps beyond it: resume redoes them
    _, graft = train(tmp_path / "b", trace, resume=str(tmp_path / "b" / "checkpoint-3"))
    assert graft.steps == STEPS
    whole, resumed = graftlab.read_trace(tmp_path / "whole"), graftlab.read_trace(trace)
    assert list(resumed.step.unique()) == list(range(STEPS))
    for col in ("norm_m", "norm_d", "ratio", "lr"):
        np.testing.assert_allclose(resumed[col].to_numpy(), whole[col].to_numpy(), rtol=1e-5, err_msg=col)


def test_callback_refuses_a_trainer_without_a_graft(tmp_path):
    args = training_args(tmp_path / "out", max_steps=1)
    trainer = transformers.Trainer(model=tiny_bert(), args=args, train_dataset=dataset(),
                                   callbacks=[hf.RecorderCallback(tmp_path / "trace")])
    with pytest.raises(GraftlabError, match="needs a graftlab.Graft") as err:
        trainer.train()
    msg = str(err.value)
    # the optimizer the Trainer built, not accelerate's wrapper, and how to pass a Graft instead
    assert "trains with AdamW (inside AcceleratedOptimizer)" in msg, msg
    assert "optimizers=(graftlab.integrations.hf.graft_optimizer(model, args, direction=" in msg and "\n" not in msg
    assert not (tmp_path / "trace").exists()


def test_accelerate_loop_records_the_same_trace_as_a_plain_loop(tmp_path):
    from accelerate import Accelerator

    def run(path, accelerate):
        model = tiny_bert()
        adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
        graft = graftlab.Graft(adam, torch.optim.SGD(model.parameters(), lr=0.1), names=model)
        sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda t: min(1.0, (t + 1) / 3))
        loader = torch.utils.data.DataLoader(dataset(), batch_size=8)
        opt = graft
        if accelerate:
            acc = Accelerator(cpu=True)
            model, opt, loader, sched = acc.prepare(model, graft, loader, sched)
            assert opt is not graft  # accelerate's wrapper: the Recorder finds the Graft inside
        with graftlab.Recorder(opt, path, model=model) as rec:
            for batch in loader:
                loss = model(**batch).loss
                (acc.backward(loss) if accelerate else loss.backward())
                opt.step()
                sched.step()
                opt.zero_grad()
                rec.log(loss=loss.detach())
        return graftlab.read_trace(path)

    plain, accel = run(tmp_path / "plain", False), run(tmp_path / "accel", True)
    assert len(accel) == len(plain) == 8 * len(plain.group.unique())
    for col in ("norm_m", "norm_d", "ratio", "lr", "loss"):
        np.testing.assert_array_equal(accel[col].to_numpy(), plain[col].to_numpy(), err_msg=col)


@pytest.mark.slow
def test_sgd_with_a_corrections_file_checkpoints_and_resumes_under_the_trainer(tmp_path):
    from graftlab.corrections import Corrections, apply

    def run(out, resume=None):
        model = tiny_bert()
        names = [n for n, _ in model.named_parameters()]
        corr = Corrections(schedule={n: [[0, 1.0], [4, 0.5]] for n in names})
        applied = apply(corr, list(model.named_parameters()), 0.1)
        opt = torch.optim.SGD(applied.param_groups, lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, applied.lr_lambda(lambda t: min(1.0, (t + 1) / 3)))
        args = training_args(out, save_strategy="steps", save_steps=3)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, sched))
        trainer.train(resume_from_checkpoint=resume)
        return model, opt

    whole, _ = run(tmp_path / "a")
    resumed, opt = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=0, msg=name)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)  # after step 4 the schedule halves it
