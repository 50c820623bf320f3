"""One definition of each run setting: a config field carries its help, bounds, choices and flag.

A field of :class:`graftlab.runs.RunConfig` (and its subclasses) declared with :func:`setting`
holds everything the command line, config files and :func:`graftlab.runs.make_config` need::

    steps: Optional[int] = setting(None, "Optimizer steps", default_text="300 unless --epochs", ge=1, le=MAX_STEPS)

- ``graftlab record`` and ``graftlab train`` build one option per field from it
  (``graftlab.cli.options``), so a new run option is one field;
- every value, from a YAML/TOML file, the command line or Python, is checked against the field's
  schema by pydantic (strict types: ``steps: true`` is no whole number, ``out: [a, b]`` no path);
  :func:`check_value` raises :class:`GraftlabError` with ``param`` set to the field's name, which the
  command line says as the field's flag (or as the config file's key).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, Annotated, Optional

from graftlab.errors import GraftlabError

# bounds that keep a run from asking for more than a machine has (a 10**23-step run, a 10**12-row part)
MAX_STEPS = 10**9
MAX_COUNT = 10**7


@dataclass(frozen=True)
class Setting:
    """What a field means to a user: help text, schema bounds and its command-line form.

    ``flag``: the long option (``"--batch-size"``; None: a config key only); ``aliases``: more
    spellings (``"-o"``); ``switch``: an on/off flag that sets the field to this value when given;
    ``repeat``: a repeatable ``NAME=VALUE`` option merged into a mapping; ``path``: a file or folder;
    ``choices``: the values allowed; ``ge``/``gt``/``le``/``lt``: numeric bounds; ``default_text``:
    the default as the help shows it (else the field's default).
    """

    help: str
    flag: Optional[str] = None
    aliases: tuple[str, ...] = ()
    choices: Optional[tuple[str, ...]] = None
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    default_text: Optional[str] = None
    switch: Any = None
    repeat: bool = False
    path: bool = False
    metavar: Optional[str] = None


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: Optional[str] = None, cli: bool = True,
            default_factory: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field described by a :class:`Setting`; ``flag`` defaults to ``--field-name``
    (``cli=False``: a config key with no command-line option)."""
    meta = {"_flag": flag, "_cli": cli, "help": help, **kwargs}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"setting": meta})


@functools.lru_cache(maxsize=None)
def settings(cls: type) -> dict[str, Setting]:
    """Field name -> :class:`Setting` of every field of config class ``cls`` that has one."""
    out = {}
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata.get("setting") or {})
        if not meta:
            continue
        flag, cli = meta.pop("_flag"), meta.pop("_cli")
        out[f.name] = Setting(flag=(flag or "--" + f.name.replace("_", "-")) if cli else None, **meta)
    return out


def flag_of(cls: type, name: str) -> Optional[str]:
    """The command-line flag of field ``name`` of ``cls`` (None: not an option)."""
    s = settings(cls).get(name)
    return s.flag if s else None


@functools.lru_cache(maxsize=None)
def _adapter(cls: type, name: str):
    from pydantic import Field, TypeAdapter

    hint = typing.get_type_hints(cls)[name]
    s = settings(cls).get(name) or Setting(help="")
    bounds = {k: getattr(s, k) for k in ("ge", "gt", "le", "lt") if getattr(s, k) is not None}
    inner, optional = hint, False
    if typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint):
        inner, optional = next(a for a in typing.get_args(hint) if a is not type(None)), True
    if inner is float:
        bounds["allow_inf_nan"] = False
    if inner in (int, float) and bounds:
        inner = Annotated[inner, Field(strict=True, **bounds)]
    elif inner is list:
        inner = list[Annotated[float, Field(strict=True, allow_inf_nan=False)]]
    elif inner is dict:
        inner = dict[str, Any]
    return TypeAdapter(Optional[inner] if optional else inner, config={"strict": True})


_KINDS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text",
          dict: "a mapping of hyperparameters (or a list of name=value)", list: "a list of numbers"}


def check_value(cls: type, name: str, value: Any) -> Any:
    """``value`` checked against field ``name`` of ``cls``: its type (strict: no bool for a number,
    no list for a path), bounds and choices; returns it (an int for a float field as a float).

    Raises:
        GraftlabError: with ``param=name``; one line: ``steps must be a whole number <= 1000000000, got 1e+23``.
    """
    from pydantic import ValidationError

    s = settings(cls).get(name)
    try:
        out = _adapter(cls, name).validate_python(value)
    except ValidationError as err:
        raise GraftlabError(f"{{{name}}} {_says(cls, name, err)}, got {value!r}", param=name) from None
    if s is not None and s.choices is not None and out is not None and out not in s.choices:
        raise GraftlabError(f"{{{name}}} must be one of {', '.join(s.choices)}, got {out!r}", param=name)
    if isinstance(out, float) and not math.isfinite(out):  # inf/nan in a field without bounds
        raise GraftlabError(f"{{{name}}} must be a finite number, got {out}", param=name)
    return out


def _says(cls: type, name: str, err: Any) -> str:
    """What the value must be, from pydantic's first error, in one short phrase."""
    e = err.errors()[0]
    ctx = e.get("ctx") or {}
    kind = e["type"]
    words = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in words:
        bound = next(iter(ctx.values()))
        return f"must be {words[kind]} {int(bound) if float(bound).is_integer() else bound}"
    if kind == "finite_number":
        return "must be a finite number"
    if getattr(settings(cls).get(name), "path", False):
        return "must be a path (text)"
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = typing.get_origin(args[0]) or args[0]
    if base is list and e["loc"]:
        return "must be a list of finite numbers"
    return f"must be {_KINDS.get(base, getattr(base, '__name__', str(base)))}"
