"""``graftlab`` command line. Commands only parse options and call the library.

Every :class:`graftlab.GraftlabError`, and every mistake the option parser finds (an unknown
option, a value that is not a number), becomes one ``error:`` line on stderr and exit code 2. An
error about a parameter names it (``GraftlabError(..., param="checkpoint_dir")``); the command line
says it as the running command's flag for it (``--checkpoint-dir``), or as the config file's key
the value came from, from the error's parameters and the command's options: no message text is read.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Optional, Sequence

import typer

import graftlab
from graftlab.cli import demo, distill, experiment, info, plot, record, show, train
from graftlab.cli.text import printable
from graftlab.errors import GraftlabError, python_name

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


def flag_namer(params: Sequence[Any], from_file: Optional[dict[str, str]] = None) -> Callable[[str, Optional[str]], str]:
    """How the running command says a parameter the library names (``GraftlabError.say``): by the
    flag of the command's option of that name (``name=True`` as the flag, ``name=False`` as its
    ``--no-`` form, ``name=value`` as ``--flag value``), or, for the options in ``from_file``
    (option name -> config file), by the config file's key (``config key 'warmup' (run.toml)``):
    the user set that value there, not as a flag. A name the command has no option for stays the
    library's."""
    options = {p.name: p for p in params if getattr(p, "param_type_name", None) == "option" and p.name}
    from_file = from_file or {}

    def name(param: str, value: Optional[str]) -> str:
        if param in from_file:
            key = f"config key {param!r} ({from_file[param]})"
            return key if value is None else f"{key} = {value.lower() if value in ('True', 'False') else value}"
        p = options.get(param)
        if p is None:
            return python_name(param, value)
        flag = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        off = next((o for o in p.secondary_opts if o.startswith("--")), None)
        if value is None or (p.is_flag and value != "False"):  # an on/off option, or a switch (--fsdp)
            return flag
        if value == "False" and off:
            return off
        return f"{flag} {value}"

    return name


def _speaking_cli(name: str, command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except GraftlabError as err:
            if err.names_parameters and err.params:
                params = typer.main.get_command(app).commands[name].params
                err.args = (err.say(flag_namer(params, _from_config_file(params, kwargs))), *err.args[1:])
            raise

    return run


def _from_config_file(params: Sequence[Any], given: dict[str, Any]) -> dict[str, str]:
    """The options of the running command whose value came from its ``--config`` file: the key is
    in the file and the option was not given on the command line (every option of a command that
    reads a config file defaults to None, or False for an on/off one, so that the file's value
    stands). Option name (the config key) -> the file, as the user wrote it."""
    config = given.get("config")
    if config is None:
        return {}
    from graftlab.runs.config_files import read_config_keys

    try:
        keys = read_config_keys(config)
    except GraftlabError:
        return {}
    return {p.name: str(config) for p in params
            if p.name and given.get(p.name) in (None, False, [], ()) and p.name in keys}


# One module per command under cli/, each exposing one function named like the command.
for _module in (record, info, distill, show, train, plot, demo, experiment):
    _name = _module.__name__.rsplit(".", 1)[1]
    _command = getattr(_module, _name)
    # the summary in `graftlab --help` whole: click cuts it to 45 characters with "..."
    app.command(_name, short_help=(_command.__doc__ or "").strip().splitlines()[0])(_speaking_cli(_name, _command))


def _one_line(text: str) -> str:
    """One line, any control character a name in it brought written as its escape."""
    return printable(" ".join(str(text).split()), limit=2_000)


def _similar_options(typed: str, params: Sequence[Any]) -> list[str]:
    """The running command's long options closest to the unknown ``typed`` (``--steps`` ->
    ``--start``): difflib's similarity of the names, ties and near misses decided by a shared
    start (a user misremembers a name's end more often than its beginning)."""
    import difflib

    name = typed.lstrip("-")
    scored = []
    for p in params:
        for opt in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ())):
            if not opt.startswith("--"):
                continue
            other = opt[2:]
            prefix = len(os.path.commonprefix([name, other]))
            score = difflib.SequenceMatcher(None, name, other).ratio() + 0.1 * min(prefix, 3)
            if score >= 0.6:
                scored.append((score, opt))
    return [opt for _, opt in sorted(scored, key=lambda s: -s[0])[:2]]


def _usage_message(err: Any) -> str:
    """The parser's message; an unknown option with the command's own closest options (click
    offers only near spellings, so ``--steps`` got ``--tie`` and never ``--start``)."""
    if type(err).__name__ == "NoSuchOption" and getattr(err, "ctx", None) is not None:
        close = _similar_options(err.option_name, err.ctx.command.params)
        hint = f" (did you mean {' or '.join(close)}?)" if close else f"; see graftlab {err.ctx.command.name} --help"
        return f"No such option: {err.option_name}{hint}"
    return err.format_message()


def os_error_line(err: OSError) -> str:
    """One line for an operating-system error the library did not word itself: the path(s) it
    names and the system's reason (``'out/t': Permission denied``)."""
    from graftlab.io.fsutil import describe_os_error

    where = [repr(os.fsdecode(f)) for f in (err.filename, err.filename2) if f is not None]
    return f"{' -> '.join(where)}: {describe_os_error(err)}" if where else describe_os_error(err)


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit code.

    A user's mistake, whether the library finds it (:class:`GraftlabError`) or the option parser
    does (an unknown option, a value that is not a number), is one ``error:`` line on stderr and
    exit code 2 (3 for a run that diverged); a run stopped by Ctrl-C or SIGTERM exits 130 or 143
    after its outputs are flushed. An error of the operating system (a read-only folder, a full
    disk, a name too long) is one ``error:`` line too, naming the path, with exit code 2.
    """
    from graftlab.io.notes import one_line_warnings

    try:
        with one_line_warnings():  # a warning is a line like every other note, not a file path and a source line
            code = app(args=None if argv is None else list(argv), prog_name="graftlab", standalone_mode=False)
    except GraftlabError as err:
        typer.echo(f"error: {_one_line(err)}", err=True)
        return int(getattr(err, "exit_code", 2))  # 3: a run that diverged (graftlab.errors.DivergedError)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        return 1
    except OSError as err:  # the operating system refused: a read-only folder, a full disk, a long name
        typer.echo(f"error: {_one_line(os_error_line(err))}", err=True)
        return 2
    except MemoryError:
        typer.echo("error: out of memory: the run needs more memory than this machine has (a smaller "
                   "--batch-size, --size or --flush-every)", err=True)
        return 2
    except ValueError as err:  # a NUL byte in a path reaches the operating system as ValueError
        if "null byte" not in str(err):
            raise
        typer.echo("error: a path cannot hold a NUL byte", err=True)
        return 2
    except typer.TyperException as err:  # the parser's: usage errors, bad values, unknown options
        if type(err).__name__ == "NoArgsIsHelpError":
            err.show()  # `graftlab` or `graftlab COMMAND` alone: the help, as before
            return 2
        typer.echo(f"error: {_one_line(_usage_message(err))}", err=True)
        return int(getattr(err, "exit_code", 2))
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
