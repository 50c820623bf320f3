"""``graftlab`` command line. Commands only parse options and call the library.

Every :class:`graftlab.GraftlabError` becomes one ``error:`` line on stderr and exit code 2.
"""
from __future__ import annotations

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


def main() -> None:
    try:
        app()
    except GraftlabError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
