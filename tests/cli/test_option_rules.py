"""One rule per option across the commands that take it, and options that only apply together with
another: each mistake is one ``error:`` line naming the flags, exit 2, before anything runs."""
from __future__ import annotations

import shlex

import pytest

from graftlab.cli.app import run

RUN = "--steps 3 --batch-size 2 --device cpu --eval-every 0 --quiet"


def refused(capsys, argv: str, *says: str) -> str:
    code = run(shlex.split(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for words in says:
        assert words in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("granularity", ["layer", "global", "head", "coordinate"])
def test_row_block_outside_vocab_is_refused_naming_both_flags(tmp_path, capsys, granularity):
    refused(capsys, f"record -o {tmp_path / 't'} {RUN} --granularity {granularity} --row-block 4",
            "--row-block", f"--granularity vocab", f"--granularity {granularity}")
    assert not (tmp_path / "t").exists()
