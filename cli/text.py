"""How commands print the names in a user's data (group names, parameter names): as data, never as
terminal input. A name from another tool's table may hold control characters (an ESC sequence
would recolour or retitle the terminal, a newline would split a table row) or run to 10^5
characters; the files graftlab writes keep every name whole, only what is printed is escaped."""
from __future__ import annotations

import re

LONGEST = 200  # characters of a name a table shows; the rest is counted

# C0 and C1 control characters and DEL (what a terminal acts on instead of printing), and the
# invisible and direction-changing characters that make a name display as another one
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


def printable(name: object, limit: int = LONGEST) -> str:
    """``name`` with each control character written as its escape (``\\x1b``, ``\\n``) and cut to
    ``limit`` characters, saying how many are left out.

    >>> printable("a\\x1b[31mb")
    'a\\\\x1b[31mb'
    """
    text = _CONTROL.sub(lambda m: repr(m[0])[1:-1], str(name))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"
