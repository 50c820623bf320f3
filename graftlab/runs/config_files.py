"""Run configs from YAML or TOML files and command-line overrides: each value converted to its
field's declared type, unknown keys refused with the list of valid ones."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

from graftlab.runs.config import C, TrainConfig
from graftlab.io.fsutil import check_regular
from graftlab.errors import ConfigFileError, GraftlabError
from graftlab.graft.optimizers import parse_hparams


# what each declared type is called in a message ("steps must be a whole number, got 'abc'")
_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text",
          dict: "a mapping of hyperparameters (or a list of name=value)", list: "a list of numbers"}


def _coerce(name: str, value: Any, hint: Any, error: Callable[[str], GraftlabError]) -> Any:
    """Convert a value read from YAML/TOML or the command line to the field's declared type;
    ``error(what is wrong)`` is the exception for a value it cannot be."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None:
            if type(None) in args:
                return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if value is None:
        raise error("cannot be empty")
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
                raise error("must be a finite number, got nan")
            return out
        if hint is str:
            return str(value)
        if hint is dict or origin is dict:
            if isinstance(value, (list, tuple)):  # ["momentum=0.9", ...]
                try:
                    return parse_hparams([str(v) for v in value])
                except GraftlabError as err:
                    raise error(f"({err})") from None
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        if hint is list or origin is list:
            if isinstance(value, str):
                value = value.split(",")
            return [float(v) for v in value]
    except GraftlabError:
        raise
    except (TypeError, ValueError, OverflowError):
        kind = _KINDS.get(origin or hint, getattr(hint, "__name__", str(hint)))
        raise error(f"must be {kind}, got {value!r}") from None
    return value


def _unknown(names: list[str], valid: list[str]) -> str:
    """``stpes (did you mean steps?), foo``"""
    out = []
    for name in names:
        close = difflib.get_close_matches(name, valid, n=1)
        out.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return ", ".join(out)


def config_from_dict(values: dict[str, Any], cls: type[C] = TrainConfig, *, source: Optional[str] = None) -> C:
    """Build config ``cls`` from a mapping of config keys (``source``: the file it was read from,
    named in messages).

    Raises:
        ConfigFileError: an unknown key (the message lists the valid ones) or a value that is not
            of its key's type.
    """
    where = f"config file {source!r}: " if source is not None else ""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigFileError(f"{where}unknown config key(s) {_unknown(unknown, fields)}: valid keys are "
                              f"{', '.join(fields)}")
    hints = typing.get_type_hints(cls)

    def error(key: str) -> Callable[[str], GraftlabError]:
        return lambda what: ConfigFileError(f"{where}config key {key!r} {what}")

    return cls(**{k: _coerce(k, v, hints[k], error(k)) for k, v in values.items()})


def load_config(path: str | os.PathLike, cls: type[C] = TrainConfig) -> C:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of config keys."""
    values = read_config_keys(path)
    return config_from_dict(values, cls, source=str(Path(path).expanduser()))


def read_config_keys(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of keys to values a YAML or TOML config file holds, unconverted.

    Raises:
        GraftlabError: the file is missing, unreadable, not UTF-8, not parseable or not a mapping.
    """
    p = Path(path).expanduser()
    check_regular(p, "config file")
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
    return {str(k): v for k, v in values.items()}


def make_config(config_path: Optional[str | os.PathLike] = None, cls: type[C] = TrainConfig, **overrides: Any) -> C:
    """A config file (or the defaults) with every override that is not None applied on top.

    Dict fields (``hparams``, ``m_hparams``, ``d_hparams``) are merged into the file's (a list of
    ``key=value`` works).

    Raises:
        ConfigFileError: a mistake in the file, naming its keys.
        GraftlabError: an override that is not a field of ``cls`` or not of its type, named as the
            parameter it is (``lr must be a finite number, got nan``).
    """
    base = load_config(config_path, cls) if config_path is not None else cls()
    values = asdict(base)
    hints = typing.get_type_hints(cls)
    unknown = sorted(k for k in overrides if k not in values)
    if unknown:
        raise GraftlabError(f"unknown parameter(s) {_unknown(unknown, list(values))} of {cls.__name__}")
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(values.get(key), dict):
            extra = parse_hparams(value) if isinstance(value, (list, tuple)) else dict(value)
            values[key] = {**values[key], **extra}
        else:
            values[key] = _coerce(key, value, hints[key], lambda what, key=key: GraftlabError(f"{key} {what}"))
    return cls(**values)
