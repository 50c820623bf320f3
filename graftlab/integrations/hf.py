"""Hugging Face ``transformers.Trainer``: graft and record with two lines (``pip install 'graftlab[hf]'``).

::

    from graftlab.integrations import hf
    graft = hf.graft_optimizer(model, args, direction=partial(torch.optim.SGD, lr=0.1))
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=(graft, None), callbacks=[hf.RecorderCallback("runs/trace")])
    trainer.train()

``graft_optimizer`` builds M as the Trainer builds its own optimizer from ``args`` (``optim``,
``learning_rate``, betas, eps, weight decay off for biases and norms) and D over the same
parameters. With ``optimizers=(graft, None)`` the Trainer builds its LR schedule
(``lr_scheduler_type``, warmup) on the Graft, which drives M's learning rate: the step size.
The Trainer wraps the Graft for accelerate (``AcceleratedOptimizer``); the callback finds it inside.

The trace holds, besides the ratios, ``lr`` (M's lr each step used) and, at logging steps
(``logging_steps``), the Trainer's own logged ``loss`` (its mean over the logging window, over all
processes) and ``grad_norm``. Under several processes (``torchrun``/``accelerate launch``) every
rank runs the same lines and rank 0 writes. A run resumed with
``trainer.train(resume_from_checkpoint=...)`` appends to the trace from the checkpoint's step on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from graftlab.errors import GraftlabError
from graftlab.graft.optimizer import Graft
from graftlab.integrations import require
from graftlab.record.recorder import Recorder

transformers = require("transformers", "hf", "graftlab.integrations.hf")

# TrainingArguments fields that say how the run trained; kept in the trace metadata
_ARGS = ("optim", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
         "lr_scheduler_type", "warmup_steps", "warmup_ratio", "max_steps", "num_train_epochs",
         "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "seed")


def _decay_names(model: nn.Module) -> set[str]:
    """Parameter names the Trainer applies weight decay to (not biases, not norm layers)."""
    try:  # the Trainer's own rule; it does not use the instance
        return set(transformers.Trainer.get_decay_parameter_names(None, model))
    except (AttributeError, TypeError):  # versions where it needs the Trainer: the same rule, spelled out
        norms = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()}
        return {n for n, _ in model.named_parameters()
                if "bias" not in n and "norm" not in n.lower() and n.rpartition(".")[0] not in norms}


def graft_optimizer(
    model: nn.Module,
    args: Any,
    direction: Callable[[list], torch.optim.Optimizer],
    *,
    granularity: Any = "layer",
    path: str = "auto",
) -> Graft:
    """M#D for ``Trainer(optimizers=(graft, None))``: M is the optimizer the Trainer would build.

    Args:
        model: the model the Trainer trains (its trainable parameters are grafted; groups take the
            ``named_parameters()`` names).
        args: the ``TrainingArguments``; M is ``args.optim`` with ``args.learning_rate``, the Adam
            betas/eps, and ``args.weight_decay`` on all but biases and norm layers, as the Trainer
            builds it.
        direction: builds D from a list of parameters, e.g. ``partial(torch.optim.SGD, lr=0.1)``.
        granularity, path: as for :class:`graftlab.Graft`.

    Raises:
        GraftlabError: ``args.optim`` names no single torch optimizer (a factory such as Muon, or a
            layer-wise optimizer), or ``direction`` does not return a torch optimizer.
    """
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or set(kwargs) & {
            "params", "model", "optimizer_dict"}:
        raise GraftlabError(f"args.optim={args.optim!r} builds no single torch optimizer to graft; "
                            "build M yourself and pass graftlab.Graft(M, D, names=model)")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = _decay_names(model)
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    magnitude = cls([g for g in groups if g["params"]], **kwargs)
    d = direction([p for _, p in named])
    if not isinstance(d, torch.optim.Optimizer):
        raise GraftlabError(f"direction must build a torch.optim.Optimizer, got {type(d).__name__}")
    return Graft(magnitude, d, granularity=granularity, names=named, path=path)


class RecorderCallback(transformers.TrainerCallback):
    """Records the Trainer's Graft to a trace at ``path`` (a :class:`graftlab.Recorder` per run).

    Args:
        path: the trace directory.
        logs: keys of the Trainer's logs to add as columns at the logging steps.
        **recorder_kwargs: passed to :class:`graftlab.Recorder` (``every``, ``flush_every``,
            ``flush_seconds``, ``kinds``, ``overwrite``, ``on_flush``, ``metadata``, ...).

    The recorder starts at ``on_train_begin`` (after a checkpoint is loaded: a resumed run appends
    to the trace from the checkpoint's step on), flushes when the Trainer saves a checkpoint, and
    closes at ``on_train_end``, where every process then waits for rank 0: once ``train()``
    returns, any rank can read the complete trace. Raises GraftlabError at the start of training when the Trainer's
    optimizer is not a Graft.
    """

    def __init__(self, path: Union[str, Path], *, logs: Iterable[str] = ("loss", "grad_norm"),
                 **recorder_kwargs: Any) -> None:
        self.path = Path(path)
        self.logs: Sequence[str] = tuple(logs)
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Optional[Recorder] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is None:
            raise GraftlabError("RecorderCallback: the Trainer has no optimizer at the start of training")
        graft = _graft_of(optimizer)
        kw = dict(self.recorder_kwargs)
        meta = {"task": type(model).__name__ if model is not None else None, "seed": args.seed,
                "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
                * max(args.world_size, 1),
                "config": {"trainer": {k: _plain(getattr(args, k, None)) for k in _ARGS}}}
        meta.update(kw.pop("metadata", None) or {})
        resumed = state.global_step > 0
        kw.setdefault("resume", resumed)
        self.recorder = Recorder(graft, self.path, model=model, metadata=meta, **kw)

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        if self.recorder is None or not logs:
            return
        values = {k: logs[k] for k in self.logs if isinstance(logs.get(k), (int, float, torch.Tensor))}
        if values:
            self.recorder.log(**values)  # attaches to the step just taken

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.flush()  # the trace on disk reaches the checkpoint's step

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # when train() returns, on any rank, the trace is complete


def _graft_of(optimizer: Any) -> Graft:
    """The Graft the Trainer trains with, inside accelerate's ``AcceleratedOptimizer``.

    Raises GraftlabError naming the optimizer inside the wrapper (the Trainer built its own: AdamW
    by default) and how to hand the Trainer a Graft."""
    inner = optimizer
    for _ in range(4):  # AcceleratedOptimizer.optimizer; DeepSpeed-style wrappers nest one more
        if isinstance(inner, Graft):
            return inner
        nested = getattr(inner, "optimizer", None)
        if nested is None or nested is inner:
            break
        inner = nested
    where = f" (inside {type(optimizer).__name__})" if inner is not optimizer else ""
    raise GraftlabError(
        f"RecorderCallback needs a graftlab.Graft optimizer, but the Trainer trains with {type(inner).__name__}{where}: "
        "pass Trainer(..., optimizers=(graftlab.integrations.hf.graft_optimizer(model, args, "
        "direction=partial(torch.optim.SGD, lr=0.1)), None))")


def _plain(value: Any) -> Any:
    value = getattr(value, "value", value)  # enums such as SchedulerType
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
