"""The options several commands share (``--max-groups``, ``--overwrite``, ...), and those of
``graftlab record`` and ``graftlab train``, built from the run config's fields.

Each field of :class:`graftlab.runs.RecordConfig` / :class:`graftlab.runs.TrainConfig` declared
with :func:`graftlab.runs.fields.setting` carries its help, choices, bounds and flag; :func:`run_options`
makes one option of each, so a new run option is one field there. Every option defaults to None
(an on/off one to off), so a value from ``--config FILE`` stands unless the option is given;
:func:`graftlab.runs.make_config` applies the given ones and checks each against its field's schema.

    @run_options(RecordConfig)
    def record(values: dict, config: options.Config = None, ...) -> None:
        cfg = make_config(config, RecordConfig, **values)
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from graftlab.runs.fields import Setting, settings

Config = Annotated[Optional[Path], typer.Option("--config", help="YAML or TOML file of settings (the same names as "
                                                "the options, with underscores); command-line options override it [default: none].")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]

SHOWN = 50  # groups a command lists by default: a table of 10^5 groups helps nobody on a terminal
MaxGroups = Annotated[int, typer.Option("--max-groups", help="List at most this many groups, saying how many are "
                                        "left out (0: all); files keep every group.")]


def check_max_groups(max_groups: int) -> int:
    """``--max-groups`` as a count to slice by (0: all; one past any list's length: all too);
    GraftlabError for a negative one, said before a command prints anything."""
    from graftlab.errors import GraftlabError

    if max_groups < 0:
        raise GraftlabError(f"--max-groups must be 0 (all) or a positive number, got {max_groups}")
    return 0 if max_groups >= sys.maxsize else max_groups


def first_groups(items: list, max_groups: int) -> list:
    """The first ``max_groups`` of ``items`` (0: all)."""
    max_groups = check_max_groups(max_groups)
    return items if max_groups == 0 else items[:max_groups]


def default_text(field: dataclasses.Field, s: Setting) -> Optional[str]:
    """The default as help says it, in the one notation every command uses: ``[default: X]``."""
    if s.switch is not None:
        return None
    if s.default_text is not None:
        return s.default_text
    default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    return "none" if default is None else str(default)


def help_text(help: str, default: Optional[str]) -> str:
    return help if default is None else f"{help} [default: {default}]"


def _option(field: dataclasses.Field, hint: Any, s: Setting) -> tuple[Any, Any]:
    """(annotation, default) of the command parameter for one config field."""
    decls = (s.flag, *s.aliases)
    text = help_text(s.help, default_text(field, s))
    if s.switch is not None:
        return Annotated[bool, typer.Option(*decls, help=text)], False
    extra: dict[str, Any] = {}
    if s.repeat:
        kind: Any = list[str]
    elif s.path:
        kind = Path
    elif s.choices is not None:  # listed in the help; checked with the field's schema, as in a config file
        kind, extra["metavar"] = str, "<" + "|".join(s.choices) + ">"
    else:
        args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
        base = args[0] if args else hint
        kind = base if base in (int, float) else str  # a list field (milestones) is given as 0.5,0.75
    if s.metavar:
        extra["metavar"] = s.metavar
    return Annotated[Optional[kind], typer.Option(*decls, help=text, **extra)], None


def run_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command ``f(values, <its own options>)``: the command gets one option per
    command-line field of ``cls`` besides its own, and ``f`` the given ones as ``values``
    (field name -> value; the options not given are left out)."""
    import typing

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "values"]
        made = []
        for name, s in settings(cls).items():
            if s.flag is None:
                continue
            annotation, default = _option(fields[name], hints[name], s)
            made.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
        names = {p.name for p in own}

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {}
            for name, value in kwargs.items():
                if name in names:
                    continue
                s = settings(cls)[name]
                if s.switch is not None:
                    value = s.switch if value else None
                if value is not None and value != []:
                    values[name] = value
            return func(values, **{k: v for k, v in kwargs.items() if k in names})

        params = made + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__wrapped__ = None  # typer reads the signature above, not the wrapped function's
        del command.__wrapped__
        return command

    return wrap
