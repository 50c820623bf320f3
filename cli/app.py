"""``graftlab`` command line. Commands only parse options and call the library.

Every :class:`graftlab.GraftlabError` becomes one ``error:`` line on stderr and exit code 2. The
library words its messages in Python terms (``pass overwrite=True``, ``checkpoint_dir``); the
command line says them in its own (``pass --overwrite``, ``--checkpoint-dir``), translated here, once,
from the running command's own option list.
"""
from __future__ import annotations

import functools
import re
import sys
from typing import Any, Callable, Optional, Sequence

import typer

import graftlab
from graftlab.cli import demo, distill, experiment, info, plot, record, show, train
from graftlab.errors import GraftlabError

app = typer.Typer(
    name="graftlab",
    help="Learning-rate grafting: record M#D ratios, distill them into corrections, train with them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: rich reads "[default: ...]" in help strings as markup and drops it, and
    # shows on/off flags as taking a <bool> value
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"graftlab {graftlab.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Learning-rate grafting toolkit: record -> distill -> train."""


def in_cli_terms(message: str, params: Sequence[Any]) -> str:
    """``message`` with the Python names of ``params``' options (click parameters) replaced by
    their flags.

    ``name=True`` becomes the flag (``name=False`` the ``--no-`` form of an on/off option),
    ``name=value`` becomes ``--flag value``, and a bare ``name`` with an underscore (never an
    English word, unlike ``window`` or ``steps``) becomes ``--flag``.
    """
    for p in params:
        if getattr(p, "param_type_name", None) != "option" or not p.name:
            continue
        flag = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        off = next((o for o in p.secondary_opts if o.startswith("--")), None)
        name = re.escape(p.name)
        edge = r"(?<![\w./-])"  # not inside a path or a longer name
        message = re.sub(rf"{edge}{name}=True\b", flag, message)
        if off:
            message = re.sub(rf"{edge}{name}=False\b", off, message)
        message = re.sub(rf"{edge}{name}=(?=\S)", f"{flag} ", message)
        if "_" in p.name:
            message = re.sub(rf"{edge}{name}(?![\w/=-]|\.\w)", flag, message)
    return message


def _speaking_cli(name: str, command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except GraftlabError as err:
            if err.args and isinstance(err.args[0], str):
                params = typer.main.get_command(app).commands[name].params
                err.args = (in_cli_terms(err.args[0], params), *err.args[1:])
            raise

    return run


# One module per command under cli/, each exposing one function named like the command.
for _module in (record, info, distill, show, train, plot, demo, experiment):
    _name = _module.__name__.rsplit(".", 1)[1]
    app.command(_name)(_speaking_cli(_name, getattr(_module, _name)))


def main() -> None:
    try:
        app()
    except GraftlabError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(getattr(err, "exit_code", 2))  # 3: a run that diverged (graftlab.errors.DivergedError)


if __name__ == "__main__":
    main()
