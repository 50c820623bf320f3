"""Run configs: what ``record()`` and ``train()`` need, checked before anything touches the disk.

    >>> cfg = TrainConfig(task="bert", optimizer="sgd", lr=0.1, hparams={"momentum": 0.9}, steps=300)
    >>> cfg.validate()                                   # every mistake now, as one GraftlabError
    >>> rec = RecordConfig(task="bert", magnitude="adam", direction="sgd", out="runs/t")
    >>> rec = load_config("run.yaml", RecordConfig)      # the same keys from YAML or TOML

Configs are flat dataclasses (nanoGPT style). :class:`RunConfig` holds the fields every run has
(task, length, schedule, system, evaluation); :class:`TrainConfig` adds one optimizer,
:class:`RecordConfig` the grafted pair M#D and the trace. ``validate()`` checks values and outputs
(an existing output is an :class:`~graftlab.errors.OutputExistsError` unless ``overwrite``);
every entry point calls it first, so a config error never costs a trace or a metrics file.
Messages name the config fields (``checkpoint_dir``), which the command line maps to its options.

Modules: ``runs`` (the dataclasses and their checks), ``files`` (YAML/TOML files and overrides),
``resume`` (when ``graftlab record`` may resume a trace without a checkpoint).
"""
from __future__ import annotations

from graftlab.config.files import config_from_dict, load_config, make_config
from graftlab.config.runs import (DEFAULT_STEPS, GRANULARITIES, RecordConfig, RunConfig, TrainConfig, check_output_file,
                                  resolve_config, total_steps)

__all__ = ["DEFAULT_STEPS", "GRANULARITIES", "RecordConfig", "RunConfig", "TrainConfig", "check_output_file",
           "config_from_dict", "load_config", "make_config", "resolve_config", "total_steps"]
