"""The one exception type graftlab raises for a user's mistake.

The CLI turns a ``GraftlabError`` into one error line and a non-zero exit; anything else is a bug
and keeps its traceback.
"""


class GraftlabError(Exception):
    """A problem with the user's input (file, option, model) that graftlab can explain in one line."""
