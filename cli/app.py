"""``graftlab`` command line. Commands only parse options and call the library.

Every :class:`graftlab.GraftlabError`, and every mistake the option parser finds (an unknown
option, a value that is not a number), becomes one ``error:`` line on stderr and exit code 2. The
library words its messages in Python terms (``pass overwrite=True``, ``checkpoint_dir``); the
command line says them in its own (``pass --overwrite``, ``--checkpoint-dir``), translated here, once,
from the running command's own option list.
"""
from __future__ import annotations

import functools
import os
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


def in_cli_terms(message: str, params: Sequence[Any], from_file: Optional[dict[str, str]] = None) -> str:
    """``message`` with the Python names of ``params``' options (click parameters) replaced by
    their flags, or, for the names in ``from_file`` (option name -> config file), by the config
    file's key (``config key 'warmup' (run.toml)``): the user set that value there, not as a flag.

    ``name=True`` becomes the flag (``name=False`` the ``--no-`` form of an on/off option),
    ``name=value`` becomes ``--flag value``, and a bare ``name`` with an underscore (never an
    English word) becomes ``--flag``. A bare name that is also an English word (``window``,
    ``steps``, ``out``, ``by``) is a name where the library's messages put names: as the
    subject that opens a message (``window must be ...``, ``out 'x' is a file``, ``every and
    flush_every must ...``), after ``either`` (``give either steps or epochs``) and in a formula
    (``start + window <= 40``).
    """
    flags: dict[str, str] = {}
    from_file = from_file or {}
    for p in params:
        if getattr(p, "param_type_name", None) != "option" or not p.name:
            continue
        name = re.escape(p.name)
        edge = r"(?<![\w./-])"  # not inside a path or a longer name
        if p.name in from_file:
            flag = f"config key {p.name!r} ({from_file[p.name]})"
            flags[p.name] = flag
            message = re.sub(rf"{edge}{name}=(True|False)\b", lambda m: f"{flag} = {m[1].lower()}", message)
            message = re.sub(rf"{edge}{name}=(?=\S)", f"{flag} = ", message)
            if "_" in p.name:
                message = re.sub(rf"{edge}{name}(?![\w/=-]|\.\w)", lambda m: flag, message)
            continue
        flag = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        flags[p.name] = flag
        off = next((o for o in p.secondary_opts if o.startswith("--")), None)
        message = re.sub(rf"{edge}{name}=True\b", flag, message)
        if off:
            message = re.sub(rf"{edge}{name}=False\b", off, message)
        message = re.sub(rf"{edge}{name}=(?=\S)", f"{flag} ", message)
        if "_" in p.name:
            message = re.sub(rf"{edge}{name}(?![\w/=-]|\.\w)", flag, message)
    return _named_subjects(message, flags)


# A list of names ("window", "every and --flush-every", "steps or epochs") where a message names
# parameters: opening it, before a verb or a quoted value, or after "either"; and a name beside an
# operator ("start + window <= 40").
_SUBJECT = re.compile(r"^(?P<names>[\w-]+(?:(?:, | and | or )[\w-]+)*)(?= (?:must|is|are)\b| ['\"(])")
_OP = r" (?:<=|>=|<|>|\+|\*) "
_FORMULA = re.compile(rf"(?<![\w./-])(?P<name>[a-z]\w*)(?={_OP})|(?P<op>{_OP})(?P<after>[a-z]\w*)(?![\w./=-])")
_EITHER = re.compile(r"(?<=\beither )(?P<names>[\w-]+(?: or [\w-]+)+)\b")
_LEAVE = re.compile(r"(?<=\bleave )(?P<names>[\w-]+)(?= unset\b)")


def _named_subjects(message: str, flags: dict[str, str]) -> str:
    def names(match: "re.Match[str]") -> str:
        words = re.split(r"(, | and | or )", match["names"])
        if not all(w in flags or w in flags.values() for w in words[::2]):
            return match[0]  # English, not a list of this command's options
        return "".join(flags.get(w, w) if i % 2 == 0 else w for i, w in enumerate(words))

    message = _LEAVE.sub(names, _EITHER.sub(names, _SUBJECT.sub(names, message, count=1)))
    def operand(match: "re.Match[str]") -> str:
        if match["name"]:
            return flags.get(match["name"], match["name"])
        return match["op"] + flags.get(match["after"], match["after"])

    return _FORMULA.sub(operand, message)


def _speaking_cli(name: str, command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except GraftlabError as err:
            if err.names_parameters and err.args and isinstance(err.args[0], str):
                params = typer.main.get_command(app).commands[name].params
                err.args = (in_cli_terms(err.args[0], params, _from_config_file(params, kwargs)),
                            *err.args[1:])
            raise

    return run


# options whose config key is spelled differently (``--hparam`` adds to the ``hparams`` mapping)
_CONFIG_KEYS = {"hparam": "hparams", "m_hparam": "m_hparams", "d_hparam": "d_hparams", "fsdp": "parallel"}


def _from_config_file(params: Sequence[Any], given: dict[str, Any]) -> dict[str, str]:
    """The options of the running command whose value came from its ``--config`` file: the key is
    in the file and the option was not given on the command line (every option of a command that
    reads a config file defaults to None, or False for an on/off one, so that the file's value
    stands). Option name -> the file, as the user wrote it."""
    config = given.get("config")
    if config is None:
        return {}
    from graftlab.runs.config_files import read_config_keys

    try:
        keys = read_config_keys(config)
    except GraftlabError:
        return {}
    return {p.name: str(config) for p in params
            if p.name and given.get(p.name) in (None, False, [], ()) and _CONFIG_KEYS.get(p.name, p.name) in keys}


# One module per command under cli/, each exposing one function named like the command.
for _module in (record, info, distill, show, train, plot, demo, experiment):
    _name = _module.__name__.rsplit(".", 1)[1]
    app.command(_name)(_speaking_cli(_name, getattr(_module, _name)))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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
