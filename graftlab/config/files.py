"""Run configs from YAML or TOML files and command-line overrides: each value converted to its
field's declared type, unknown keys refused with the list of valid ones."""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from graftlab.config.runs import C, TrainConfig
from graftlab.errors import GraftlabError
from graftlab.optimizers import parse_hparams


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a value read from YAML/TOML or the command line to the field's declared type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None:
            if type(None) in args:
                return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if value is None:
        raise GraftlabError(f"config key {name!r} cannot be empty")
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            out = float(value)
            if math.isnan(out):
                raise ValueError(value)
            return out
        if hint is str:
            return str(value)
        if hint is dict or origin is dict:
            if isinstance(value, (list, tuple)):  # ["momentum=0.9", ...]
                return parse_hparams([str(v) for v in value])
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        if hint is list or origin is list:
            if isinstance(value, str):
                value = value.split(",")
            return [float(v) for v in value]
    except (TypeError, ValueError):
        raise GraftlabError(f"config key {name!r}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def config_from_dict(values: dict[str, Any], cls: type[C] = TrainConfig) -> C:
    """Build config ``cls`` from a mapping; unknown keys are a GraftlabError listing the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise GraftlabError(f"unknown config key(s) {', '.join(unknown)}: valid keys are {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def load_config(path: str | os.PathLike, cls: type[C] = TrainConfig) -> C:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of config keys."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise GraftlabError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise GraftlabError(f"config file {str(p)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise GraftlabError(f"cannot read config file {str(p)!r}: {err.strerror or err}") from None
    try:
        if p.suffix.lower() == ".toml":
            values = tomllib.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            raise GraftlabError(f"config file {str(p)!r} must end in .yaml, .yml or .toml")
    except GraftlabError:
        raise
    except Exception as err:  # the parsers' own syntax errors
        raise GraftlabError(f"cannot parse config file {str(p)!r}: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise GraftlabError(f"config file {str(p)!r} must hold a mapping of keys to values")
    return config_from_dict(values, cls)


def make_config(config_path: Optional[str | os.PathLike] = None, cls: type[C] = TrainConfig, **overrides: Any) -> C:
    """A config file (or the defaults) with every override that is not None applied on top.

    Dict fields (``hparams``, ``m_hparams``, ``d_hparams``) are merged into the file's (a list of
    ``key=value`` works).
    """
    base = load_config(config_path, cls) if config_path is not None else cls()
    values = asdict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(values.get(key), dict):
            extra = parse_hparams(value) if isinstance(value, (list, tuple)) else dict(value)
            values[key] = {**values[key], **extra}
        else:
            values[key] = value
    return config_from_dict(values, cls)
