"""One rule per option across the commands that take it, and options that only apply together with
another: each mistake is one ``error:`` line naming the flags, exit 2, before anything runs."""
from __future__ import annotations

import shlex

import pytest

from graftlab.cli.app import run
from tests.cli import error_line

RUN = "--steps 3 --batch-size 2 --device cpu --eval-every 0 --quiet"


def refused(capsys, argv: str, *says: str) -> str:
    line = error_line(capsys, argv)[0]
    for words in says:
        assert words in line, line
    return line


@pytest.mark.parametrize("granularity", ["layer", "global", "head", "coordinate"])
def test_row_block_outside_vocab_is_refused_naming_both_flags(tmp_path, capsys, granularity):
    refused(capsys, f"record -o {tmp_path / 't'} {RUN} --granularity {granularity} --row-block 4",
            "--row-block", f"--granularity vocab", f"--granularity {granularity}")
    assert not (tmp_path / "t").exists()


# -- a median filter's width: one rule in distill --filter and plot --width ----------------------------
@pytest.fixture
def a_trace(tmp_path):
    from tests.cli.test_bad_inputs import make_trace

    return make_trace(tmp_path / "T")


@pytest.mark.parametrize("cmd,flag", [("distill {t} --window 10 -o {o}/c.json", "--filter"),
                                      ("plot {t} --figure 5 --steps 40 -o {o}/f.png", "--width")])
@pytest.mark.parametrize("bad", ["2", "-1", "-3", "100003"])
def test_a_filter_width_follows_one_rule_in_every_command(a_trace, tmp_path, capsys, cmd, flag, bad):
    line = refused(capsys, cmd.format(t=a_trace, o=tmp_path) + f" {flag} {bad}", flag, f"got {bad}")
    assert "0 or 1" in line or "at most" in line  # says what is accepted
    assert not list(tmp_path.glob("c.json")) and not list(tmp_path.glob("f.png"))


@pytest.mark.parametrize("cmd,flag,made", [("distill {t} --window 10 -o {o}/c.json", "--filter", "c.json"),
                                           ("plot {t} --figure 5 --steps 40 -o {o}/f.png", "--width", "f.png")])
@pytest.mark.parametrize("off", ["0", "1"])
def test_zero_and_one_turn_the_filter_off_in_every_command(a_trace, tmp_path, capsys, cmd, flag, made, off):
    assert run(shlex.split(cmd.format(t=a_trace, o=tmp_path) + f" {flag} {off}")) == 0, capsys.readouterr().err
    assert (tmp_path / made).exists()


@pytest.mark.parametrize("cmd,flag", [("distill", "--filter"), ("plot", "--width")])
def test_the_help_says_what_turns_the_filter_off(capsys, cmd, flag):
    import re

    from typer.testing import CliRunner

    from graftlab.cli.app import app

    res = CliRunner().invoke(app, [cmd, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    text = re.sub(r"[\s│]+", " ", res.output)
    option = next(part for part in text.split(" --") if part.startswith(flag[2:] + " "))
    assert "odd" in option and "0 or 1 turns it off" in option, option


# -- learning rates: > 0 and finite in every command ------------------------------------------------
LR_FLAGS = [("train", "--lr"), ("record", "--magnitude-lr"), ("record", "--lr"), ("record", "--direction-lr"),
            ("demo", "--magnitude-lr"), ("demo", "--direction-lr")]


def _cmd(cmd: str, tmp_path) -> str:
    if cmd == "record":
        return f"record -o {tmp_path / 't'} {RUN}"
    if cmd == "train":
        return f"train {RUN}"
    return f"demo --quick --device cpu --quiet --jobs 1 -o {tmp_path / 'demo'}"


@pytest.mark.parametrize("cmd,flag", LR_FLAGS)
@pytest.mark.parametrize("bad", ["0", "-0.1", "nan", "inf"])
def test_every_learning_rate_must_be_positive_and_finite(tmp_path, capsys, cmd, flag, bad):
    said = flag if flag != "--lr" or cmd == "train" else "--magnitude-lr"  # record's --lr is M's lr
    refused(capsys, f"{_cmd(cmd, tmp_path)} {flag} {bad}", said, bad)
    assert not list(tmp_path.iterdir())


# -- --threads: one rule in every command that trains ------------------------------------------------
@pytest.mark.parametrize("cmd", ["train", "record", "demo"])
@pytest.mark.parametrize("bad", ["0", "-1"])
def test_threads_follow_one_rule_in_every_command(tmp_path, capsys, cmd, bad):
    refused(capsys, f"{_cmd(cmd, tmp_path)} --threads {bad}", "--threads", ">= 1", f"got {bad}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cmd", ["train", "record", "demo"])
def test_the_threads_help_says_the_same_in_every_command(cmd):
    from typer.main import get_command

    from graftlab.cli.app import app

    option = next(p for p in get_command(app).commands[cmd].params if p.name == "threads")
    assert "0 takes" not in option.help and "PyTorch" in option.help


def _corrections(path, n):
    import json

    path.write_text(json.dumps({"format": "graftlab.corrections/1",
                                "multipliers": {f"blocks.{i % 4}.attn.query.weight[rows {i}]": 1.0 + i for i in range(n)}}))
    return path


@pytest.mark.parametrize("command", ["info {trace}", "distill {trace} -o {tmp}/c.json", "show {corr}"])
def test_max_groups_is_one_option_of_every_command_that_lists_groups(tmp_path, capsys, command):
    from tests.trace_builder import metadata, write_trace

    import numpy as np

    names = [f"blocks.{i % 4}.attn.query.weight[rows {i}]" for i in range(120)]
    trace = write_trace(tmp_path / "t", metadata([{"name": n} for n in names]), np.arange(8),
                        np.random.default_rng(0).lognormal(size=(8, len(names))))
    argv = command.format(trace=trace, tmp=tmp_path, corr=_corrections(tmp_path / "k.json", 120))
    refused(capsys, f"{argv} --max-groups -1", "--max-groups must be 0 (all) or a positive number, got -1")
    for limit, listed in ((None, 50), (7, 7), (0, 120), (10 ** 20, 120)):
        code = run(shlex.split(argv + ("" if limit is None else f" --max-groups {limit}") + " --overwrite"
                               * ("distill" in argv)))
        out = capsys.readouterr().out
        assert code == 0
        shown = sum(1 for n in names if f"{n} " in out or f"{n}│" in out)
        assert shown == listed, (limit, shown)
        assert (f"{120 - listed} more groups not listed" in out) == (listed < 120)
