"""A warning on the command line is one ``warning:`` line, not a file path and a source line."""
import subprocess
import sys
import warnings

from graftlab.io.notes import one_line_warnings


def test_a_warning_is_one_line_once(capsys):
    with one_line_warnings():
        for _ in range(3):
            warnings.warn("the median filter is wider\n than the window")
    err = capsys.readouterr().err
    assert err == "warning: the median filter is wider than the window\n"
    with warnings.catch_warnings(record=True) as caught:  # outside the block: Python's own handling again
        warnings.simplefilter("always")
        warnings.warn("after")
    assert len(caught) == 1


def test_the_command_line_prints_library_warnings_as_one_line(tmp_path):
    # a trace with a missing part: read_trace warns; the command says it in one line
    from tests.trace_builder import metadata, write_trace
    import numpy as np

    groups = [{"name": "a.weight", "kind": "Q"}, {"name": "b.weight", "kind": "V"}]
    path = write_trace(tmp_path / "t", metadata(groups), np.arange(60), np.ones((60, 2)), part_steps=20)
    next(p for p in sorted(path.glob("part-*")) if "20" in p.name).unlink()
    res = subprocess.run([sys.executable, "-m", "graftlab.cli.app", "plot", str(path), "--figure", "5",
                          "-o", str(tmp_path / "f.png")], capture_output=True, text=True, timeout=120)
    warning_lines = [line for line in res.stderr.splitlines() if "missing" in line]
    assert warning_lines and all(line.startswith("warning: ") for line in warning_lines), res.stderr
    assert "UserWarning" not in res.stderr and ".py:" not in res.stderr
