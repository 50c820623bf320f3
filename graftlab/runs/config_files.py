"""Run configs from YAML or TOML files and command-line overrides: each value checked against its
field's schema (:mod:`graftlab.runs.fields`), unknown keys refused with the list of valid ones."""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

from graftlab.runs.config import C, TrainConfig
from graftlab.runs.fields import check_value
from graftlab.io.fsutil import check_regular
from graftlab.errors import ConfigFileError, GraftlabError
from graftlab.graft.optimizers import parse_hparams


def _field_value(cls: type, name: str, value: Any, error: Callable[[str], GraftlabError]) -> Any:
    """A value for field ``name`` as written in a file or given on the command line, in the field's
    shape (``"0.5,0.75"`` -> ``[0.5, 0.75]``; ``["momentum=0.9"]`` -> ``{"momentum": 0.9}``; a path
    -> its text), then checked against the field's schema (:func:`graftlab.runs.fields.check_value`);
    ``error(what is wrong)`` is the exception for a value it cannot be."""
    default = next(f for f in dataclasses.fields(cls) if f.name == name)
    hint = typing.get_type_hints(cls)[name]
    if value is None and type(None) not in typing.get_args(hint):  # `batch_size:` with nothing after it
        raise error("cannot be empty")
    kind = type(default.default_factory()) if default.default_factory is not dataclasses.MISSING else None
    if kind is list and isinstance(value, str):  # --milestones 0.5,0.75
        parts = [v.strip() for v in value.split(",")]
        try:
            value = [float(v) for v in parts]
        except ValueError:
            raise error(f"must be comma-separated numbers, got {value!r}") from None
    elif kind is dict:
        if isinstance(value, (list, tuple)):  # ["momentum=0.9", ...]
            try:
                value = parse_hparams([str(v) for v in value])
            except GraftlabError as err:
                raise error(f"({err})") from None
        elif isinstance(value, dict):
            value = {str(k): tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        else:
            raise error(f"must be a mapping of hyperparameters (or a list of name=value), got {value!r}")
    elif isinstance(value, os.PathLike):
        value = os.fspath(value)
    try:
        return check_value(cls, name, value)
    except GraftlabError as err:
        subject = f"{{{name}}} "  # the field's own checks open with its name
        raise error(err.template[len(subject):] if err.template.startswith(subject) else err.say()) from None


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
    def error(key: str) -> Callable[[str], GraftlabError]:
        return lambda what: ConfigFileError(f"{where}config key {key!r} {what}")

    return cls(**{k: _field_value(cls, k, v, error(k)) for k, v in values.items()})


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
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in overrides if k not in fields)
    if unknown:
        raise GraftlabError(f"unknown parameter(s) {_unknown(unknown, sorted(fields))} of {cls.__name__}")
    given = {}
    for key, value in overrides.items():  # the options first: a bad one is named as given
        if value is not None:
            def error(what: str, key: str = key) -> GraftlabError:
                return GraftlabError(f"{{{key}}} {what}", param=key)

            given[key] = _field_value(cls, key, value, error)
    # then the file's values, every one of them, whether an option replaces it or not
    values = asdict(load_config(config_path, cls) if config_path is not None else cls())
    for key, value in given.items():
        values[key] = {**values[key], **value} if isinstance(values.get(key), dict) else value
    return cls(**values)
