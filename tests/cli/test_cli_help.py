"""The help of every command shows every option's default, and on/off flags as flags."""
import re

import pytest
import typer
from typer.testing import CliRunner

from graftlab.cli.app import app

COMMANDS = sorted(typer.main.get_command(app).commands)


def _entries(text: str) -> dict[str, str]:
    """Option entries of a click help page: first long flag -> the entry's text, lines joined."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-\S.*)$", line)
        if m:
            flags = re.findall(r"--[\w-]+", m.group(1).split("  ")[0])
            current = flags[0] if flags else None
            if current:
                entries[current] = m.group(1)
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_every_command_is_checked():
    assert {"record", "info", "distill", "train", "plot", "demo", "experiment", "show"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_default(name):
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    entries = _entries(result.output)
    params = [p for p in typer.main.get_command(app).commands[name].params
              if p.param_type_name == "option" and p.name != "help"]
    assert params
    for p in params:
        flag = next(o for o in p.opts if o.startswith("--"))
        entry = entries.get(flag) or next((v for v in entries.values() if flag in v.split("  ")[0]), None)
        assert entry is not None, f"{name} {flag} missing from help:\n{result.output}"
        head = entry.split("  ")[0]
        if p.is_flag and not p.secondary_opts:  # an off-by-default switch: no value, nothing to default
            assert not p.default and "<" not in head, f"{name} {flag}: {entry}"
        else:
            assert re.search(r"\b(default|required)\b", entry, re.I), f"{name} {flag} shows no default: {entry}"


def test_bracketed_defaults_in_help_strings_survive():
    out = CliRunner().invoke(app, ["demo", "--help"], terminal_width=100).output
    assert "120" in _entries(out)["--steps"] and "256" in _entries(out)["--batch-size"]
    out = CliRunner().invoke(app, ["distill", "--help"], terminal_width=100).output
    assert "<TRACE>.corrections" in _entries(out)["--out"]


def test_output_options_are_named_alike():
    """-o/--out on every command that writes (distill keeps its older --output too)."""
    out = CliRunner().invoke(app, ["distill", "--help"], terminal_width=100).output
    head = _entries(out)["--out"].split("  ")[0]
    assert "-o" in head and "--output" in head
    for name in ("plot", "record", "demo"):
        out = CliRunner().invoke(app, [name, "--help"], terminal_width=100).output
        assert "-o" in _entries(out)["--out"].split("  ")[0], name


def test_record_overwrite_says_it_replaces_a_trace_folder():
    out = CliRunner().invoke(app, ["record", "--help"], terminal_width=100).output
    assert "trace folder" in _entries(out)["--overwrite"]


@pytest.mark.parametrize("name", ["record", "train"])
def test_task_help_names_every_task(name):
    from graftlab.tasks import TASKS

    entry = _entries(CliRunner().invoke(app, [name, "--help"], terminal_width=100).output)["--task"]
    for task in TASKS:
        assert re.search(rf"\b{task}\b", entry), f"{name} --task help lacks {task}: {entry}"


def test_readme_task_table_has_every_task():
    from pathlib import Path

    from graftlab.tasks import TASKS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("Built-in tasks", 1)[1].split("\n\n")[1]
    rows = {m.group(1) for m in re.finditer(r"^\| `(\w+)` \|", table, re.M)}
    assert rows == set(TASKS), rows


@pytest.mark.parametrize("name", COMMANDS)
def test_one_default_notation(name):
    """Every default is written ``[default: X]``; ``(default: X)`` is gone."""
    out = CliRunner().invoke(app, [name, "--help"], terminal_width=100).output
    assert "(default" not in out, out


@pytest.mark.parametrize("name,flag", [("record", "--task"), ("train", "--task"), ("record", "--granularity"),
                                       ("record", "--schedule"), ("train", "--optimizer"), ("record", "--magnitude"),
                                       ("record", "--on-divergence"), ("train", "--size")])
def test_choices_are_listed(name, flag):
    head = _entries(CliRunner().invoke(app, [name, "--help"], terminal_width=200).output)[flag].split("  ")[0]
    assert "|" in head and "<str>" not in head, head


def test_schedule_default_names_every_task():
    from graftlab.tasks import TASKS

    entry = _entries(CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output)["--schedule"]
    for task in TASKS:
        assert task in entry.split("[default:", 1)[1], entry


def test_root_help_keeps_command_summaries_whole():
    out = CliRunner().invoke(app, ["--help"], terminal_width=100).output
    assert "..." not in out.split("Commands:", 1)[1], out


def test_plot_and_distill_share_rounding_and_window_defaults():
    import inspect

    from graftlab.cli.distill import distill
    from graftlab.cli.plot import plot

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default.default

    assert default(plot, "round") == default(distill, "round") == "none"
    assert default(plot, "window") is None and default(distill, "window") is None  # capped to the trace
    for name in ("plot", "distill"):
        entries = _entries(CliRunner().invoke(app, [name, "--help"], terminal_width=200).output)
        assert "first quarter of the trace" in entries["--window"], name
        assert "DA<beta>" in entries["--round"] and "Dauto" in entries["--round"], name
    demo = _entries(CliRunner().invoke(app, ["demo", "--help"], terminal_width=200).output)["--round"]
    assert "DA<beta>" in demo and "Dauto" in demo
