"""The one exception type graftlab raises for a user's mistake.

``GraftlabError`` subclasses ``ValueError``, so code that already catches ``ValueError`` around
torch.optim-style validation keeps working. Messages are one line worded in API terms. An error
about a parameter says so: ``param`` names it (or several), and the message writes each name as a
placeholder, ``{window}`` or ``{overwrite=True}``::

    raise GraftlabError("{window} must be a positive number of steps, got 0", param="window")

``str(err)`` says the Python name (``window``, ``overwrite=True``); the CLI says the running
command's flag for the same field (``--window``, ``--overwrite``) or the config file's key it came
from, through :meth:`GraftlabError.say`: no message text is parsed. The CLI turns a
``GraftlabError`` into one ``error:`` line and exit code 2 (3 for a :class:`DivergedError`).
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Optional, Union

# {name} or {name=value}: a parameter as the message names it
_PLACEHOLDER = re.compile(r"\{(\w+)(?:=([^{}]*))?\}")


def python_name(param: str, value: Optional[str]) -> str:
    """How the library says a parameter: ``window``, ``overwrite=True``."""
    return param if value is None else f"{param}={value}"


def placeholders(text: str) -> tuple[str, ...]:
    """The parameter names written as placeholders in ``text`` (``"{out}"`` -> ``("out",)``)."""
    return tuple(dict.fromkeys(m[1] for m in _PLACEHOLDER.finditer(text)))


class GraftlabError(ValueError):
    """A problem with the user's input (file, option, model) that graftlab can explain in one line.

    Args:
        message: one line; the parameters in ``param`` written as ``{name}`` or ``{name=value}``.
        param: the parameter (or parameters) the error is about, as the Python API names them.
    """

    names_parameters = True  # False: the message names a config file's keys, kept as written

    def __init__(self, message: object = "", *args: object, param: Union[str, Iterable[str], None] = None):
        self.params: tuple[str, ...] = (param,) if isinstance(param, str) else tuple(param or ())
        self.template = str(message)
        super().__init__(self.say(), *args)

    def say(self, name: Callable[[str, Optional[str]], str] = python_name) -> str:
        """The message with each of its parameters said by ``name(param, value or None)``."""
        if not self.params:
            return self.template
        return _PLACEHOLDER.sub(lambda m: name(m[1], m[2]) if m[1] in self.params else m[0], self.template)

    def __reduce__(self):  # pickled across processes with its parameters
        return (_rebuild, (type(self), self.template, self.params, self.__dict__))


def _rebuild(cls: type, template: str, params: tuple, state: dict) -> "GraftlabError":
    err = GraftlabError.__new__(cls)
    GraftlabError.__init__(err, template, param=params)
    err.__dict__.update(state)
    return err


class ConfigFileError(GraftlabError):
    """A mistake inside a config file (YAML/TOML). Its message names the file's keys as written
    there (``batch_size``), which the CLI keeps: they are not the command's options."""

    names_parameters = False


class OutputExistsError(GraftlabError):
    """An output path exists and the caller did not ask to replace it (``overwrite=False``)."""

    def __init__(self, path: str | os.PathLike, what: str = "output"):
        self.path = os.fspath(path)
        super().__init__(f"{what} {self.path!r} already exists; pass {{overwrite=True}} to replace it",
                         param=("overwrite", *placeholders(what)))


class ClosedError(GraftlabError, RuntimeError):
    """An object was used after its ``close()`` (a :class:`graftlab.Recorder` given values to log):
    a call at the wrong time, as ``ValueError: I/O operation on closed file`` is, and also a
    ``RuntimeError`` for code that catches that."""


class DivergedError(GraftlabError):
    """A run stopped because its loss, gradients or step norms stopped being finite (see
    ``graftlab.runs.FitResult.raise_if_diverged``). The CLI exits with :attr:`exit_code` 3, apart
    from the 2 of a bad input, after the metrics and trace of the steps run are written."""

    exit_code = 3


# ---------------------------------------------------------------------------------------------------
# Argument checks for constructors (Graft, Recorder), torch.optim style: each wrong type or value is
# one GraftlabError naming its parameter, raised before anything is built.


def check_whole(name: str, value: object, *, ge: int = 0, le: Optional[int] = None, optional: bool = False) -> Optional[int]:
    """``value`` as an int in ``[ge, le]`` (None allowed when ``optional``); a bool, a float such as
    2.5 or a string is refused, never truncated or parsed."""
    import numbers

    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GraftlabError(f"{{{name}}} must be a whole number{_range(ge, le)}, got {value!r}", param=name)
    if value < ge or (le is not None and value > le):
        raise GraftlabError(f"{{{name}}} must be a whole number{_range(ge, le)}, got {value!r}", param=name)
    return int(value)


def check_flag(name: str, value: object) -> bool:
    """``value`` as a bool; ``1``, ``"yes"`` or None are refused (a typo, not a switch)."""
    if not isinstance(value, bool):
        raise GraftlabError(f"{{{name}}} must be True or False, got {value!r}", param=name)
    return value


def check_choice(name: str, value: object, choices: Iterable[object]) -> object:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        said = ", ".join(repr(c) for c in choices)
        raise GraftlabError(f"{{{name}}} must be one of {said}, got {value!r}", param=name)
    return value


def _range(ge: int, le: Optional[int]) -> str:
    return f" in [{ge}, {le}]" if le is not None else f" >= {ge}"
