"""PyTorch Lightning: a Graft from ``configure_optimizers`` and a callback that records it.

``pip install 'graftlab[lightning]'``. In the LightningModule::

    def configure_optimizers(self):
        adam = torch.optim.Adam(self.parameters(), lr=1e-3)
        sgd = torch.optim.SGD(self.parameters(), lr=0.1)
        graft = graftlab.Graft(adam, sgd, names=self)
        sched = torch.optim.lr_scheduler.LambdaLR(graft, warmup)   # drives M's lr: the step size
        return {"optimizer": graft, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

and ``pl.Trainer(..., callbacks=[RecorderCallback("runs/trace")])``. The trace holds the ratios,
``lr`` (M's lr each step used) and ``loss``: the ``loss`` that ``training_step`` returned for the
batch of each optimizer step (this process's loss; the last batch of an accumulation), kept on
its device until the Recorder flushes. Under DDP every rank runs the callback and rank 0 writes.
A fit resumed from a checkpoint (``ckpt_path=``) appends to the trace from the checkpoint's step.

Lightning ships as ``lightning`` (``lightning.pytorch``) and as ``pytorch_lightning``; the callback
derives from the first importable, which must be the one whose Trainer runs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from graftlab.errors import GraftlabError
from graftlab.graft.optimizer import Graft
from graftlab.integrations import require
from graftlab.record.recorder import Recorder

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    pl = require("pytorch_lightning", "lightning", "graftlab.integrations.lightning")


def _the_graft(trainer: Any) -> Graft:
    grafts = []
    for opt in trainer.optimizers:
        try:
            grafts.append(Recorder._find_graft(opt))
        except GraftlabError:
            pass
    if len(grafts) != 1:
        names = ", ".join(type(o).__name__ for o in trainer.optimizers) or "none"
        raise GraftlabError(f"RecorderCallback needs configure_optimizers to return exactly one graftlab.Graft; "
                            f"the Trainer holds: {names}")
    return grafts[0]


class RecorderCallback(pl.Callback):
    """Records the LightningModule's Graft to a trace at ``path`` (a :class:`graftlab.Recorder`).

    Args:
        path: the trace directory.
        log_loss: add column ``loss`` from ``training_step``'s output.
        **recorder_kwargs: passed to :class:`graftlab.Recorder` (``every``, ``flush_every``,
            ``flush_seconds``, ``kinds``, ``overwrite``, ``on_flush``, ``metadata``, ...).

    The recorder starts at ``on_train_start`` (after a checkpoint is restored), flushes when
    Lightning saves a checkpoint, and closes when training ends (every process then waits for
    rank 0, so that any rank can read the complete trace once ``fit()`` returns) or fails. Raises GraftlabError at
    the start of training unless the Trainer holds exactly one Graft.
    """

    def __init__(self, path: Union[str, Path], *, log_loss: bool = True, **recorder_kwargs: Any) -> None:
        super().__init__()
        self.path = Path(path)
        self.log_loss = log_loss
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Optional[Recorder] = None
        self._graft: Optional[Graft] = None
        self._logged_step = -1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        graft = self._graft = _the_graft(trainer)
        kw = dict(self.recorder_kwargs)
        meta = {"task": type(pl_module).__name__,
                "config": {"lightning": {"max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
                                         "accumulate_grad_batches": trainer.accumulate_grad_batches,
                                         "world_size": trainer.world_size, "precision": str(trainer.precision)}}}
        meta.update(kw.pop("metadata", None) or {})
        kw.setdefault("resume", trainer.global_step > 0)
        self.recorder = Recorder(graft, self.path, model=pl_module, metadata=meta, **kw)
        self._logged_step = graft.steps - 1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        rec, graft = self.recorder, self._graft
        if rec is None or not self.log_loss or graft.steps - 1 == self._logged_step:
            return  # no optimizer step since the last batch (gradient accumulation)
        self._logged_step = graft.steps - 1
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach() if hasattr(loss, "detach") else loss
        k = trainer.accumulate_grad_batches
        rec.log(loss=loss * k if k != 1 else loss)  # Lightning divided it by k for the backward pass

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        if self.recorder is not None:
            self.recorder.flush()  # the trace on disk reaches the checkpoint's step

    def _close(self) -> None:
        if self.recorder is not None:
            rec, self.recorder = self.recorder, None
            rec.close()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        trainer.strategy.barrier("graftlab-trace")  # when fit() returns, on any rank, the trace is complete

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()  # keep what was recorded
