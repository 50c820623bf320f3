"""The one exception type graftlab raises for a user's mistake.

``GraftlabError`` subclasses ``ValueError``, so code that already catches ``ValueError`` around
torch.optim-style validation keeps working. Messages are one line worded in API terms: parameters
by their Python names (``pass overwrite=True``, ``allow_missing=True``, ``checkpoint_dir``), never
command-line flags. The CLI turns a ``GraftlabError`` into one ``error:`` line and exit code 2
(3 for a :class:`DivergedError`), saying each parameter name of the running command as its flag
(``--overwrite``, ``--checkpoint-dir``; see ``graftlab.cli.app.in_cli_terms``). Anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import os


class GraftlabError(ValueError):
    """A problem with the user's input (file, option, model) that graftlab can explain in one line."""

    names_parameters = True  # the message names Python parameters (the CLI says them as flags)


class ConfigFileError(GraftlabError):
    """A mistake inside a config file (YAML/TOML). Its message names the file's keys as written
    there (``batch_size``), which the CLI keeps: they are not the command's options."""

    names_parameters = False


class OutputExistsError(GraftlabError):
    """An output path exists and the caller did not ask to replace it (``overwrite=False``)."""

    def __init__(self, path: str | os.PathLike, what: str = "output"):
        self.path = os.fspath(path)
        super().__init__(f"{what} {self.path!r} already exists; pass overwrite=True to replace it")


class DivergedError(GraftlabError):
    """A run stopped because its loss, gradients or step norms stopped being finite (see
    ``graftlab.runs.FitResult.raise_if_diverged``). The CLI exits with :attr:`exit_code` 3, apart
    from the 2 of a bad input, after the metrics and trace of the steps run are written."""

    exit_code = 3
