"""Stage 6, runs: whole runs of the built-in tasks, what ``graftlab record`` and ``graftlab train`` do.

Takes in a run config (task, optimizers, schedule, corrections file); hands on metrics files, traces
(through :mod:`graftlab.record`) and checkpoints. Importing this package imports no torch: the names
below load on first use.

    >>> from graftlab.runs import RecordConfig, TrainConfig
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
- :mod:`graftlab.runs.metrics`: the per-step metrics file a run writes (:func:`read_metrics`);
- :mod:`graftlab.runs.config`: the flat run configs (:class:`RecordConfig`, :class:`TrainConfig`),
  checked before anything touches the disk; :mod:`graftlab.runs.config_files` reads them from
  YAML/TOML; :mod:`graftlab.runs.resume_check` says when a trace may be resumed.
"""
from graftlab._lazy import lazy_exports

_NAMES = {
    **dict.fromkeys(["FitResult", "fit"], "graftlab.runs.loop"),
    **dict.fromkeys(["METRICS_FORMAT", "read_metrics", "write_metrics"], "graftlab.runs.metrics"),
    **dict.fromkeys(["RecordResult", "record", "train"], "graftlab.runs.run"),
    **dict.fromkeys(["DEFAULT_STEPS", "GRANULARITIES", "RecordConfig", "RunConfig", "TrainConfig", "check_output_file",
                     "resolve_config", "total_steps"], "graftlab.runs.config"),
    **dict.fromkeys(["config_from_dict", "load_config", "make_config"], "graftlab.runs.config_files"),
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
