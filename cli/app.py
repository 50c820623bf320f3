"""``graftlab`` command line. Commands only parse options and call the library.

Every :class:`graftlab.GraftlabError` becomes one ``error:`` line on stderr and exit code 2.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Optional

import typer

import graftlab
from graftlab.errors import GraftlabError

app = typer.Typer(
    name="graftlab",
    help="Learning-rate grafting: record M#D ratios, distill them into corrections, train with them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


# One module per command under cli/, each exposing one function named like the command.
COMMANDS = ("record", "info", "distill", "train", "plot", "demo", "experiment")
for _name in COMMANDS:
    if importlib.util.find_spec(f"cli.{_name}") is not None:
        app.command(_name)(getattr(importlib.import_module(f"cli.{_name}"), _name))


def main() -> None:
    try:
        app()
    except GraftlabError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
