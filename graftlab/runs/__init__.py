"""Whole runs of the built-in tasks: what ``graftlab record`` and ``graftlab train`` do.

    >>> from graftlab.config import RecordConfig, TrainConfig
    >>> from graftlab.runs import record, train
    >>> rec = record(RecordConfig(task="bert", magnitude="adam", direction="sgd", steps=300, out="runs/t"))
    >>> res = train(TrainConfig(task="bert", optimizer="sgd", lr=0.1, steps=300), corrections="c.json")
    >>> res.final                                            # {"loss": ..., "accuracy": ...}

Modules, in the order a run uses them:

- :mod:`graftlab.runs.run`: :func:`record` and :func:`train`: validate, environment, task,
  optimizers, Graft and Recorder, loop;
- :mod:`graftlab.runs.loop`: :func:`fit`, the training loop both share (also for your own task);
- :mod:`graftlab.runs.divergence`: the per-step non-finite check (no host sync) and what it found;
- :mod:`graftlab.runs.restarts`: stopping or restarting after a divergence (``on_divergence``);
- :mod:`graftlab.runs.metrics`: the per-step metrics file a run writes (:func:`read_metrics`).

The configs are in :mod:`graftlab.config`.
"""
from graftlab.runs.loop import FitResult, fit
from graftlab.runs.metrics import METRICS_FORMAT, read_metrics, write_metrics
from graftlab.runs.run import RecordResult, record, train

__all__ = ["FitResult", "METRICS_FORMAT", "RecordResult", "fit", "read_metrics", "record", "train", "write_metrics"]
