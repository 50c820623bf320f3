"""Shared checks of the command line's tests."""
from __future__ import annotations

import shlex


def error_line(capsys, argv: str) -> tuple[str, str]:
    """Run ``graftlab argv`` in-process and check it fails as a user's mistake must: exit 2 and one
    ``error:`` line on stderr. Returns ``(that line, stdout)``."""
    from graftlab.cli.app import run

    code = run(shlex.split(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0], out
