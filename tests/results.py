"""Figures a test run measured, written as a benchmark result for bench/report.py.

The README's reliability table quotes counts that only a run of the tests knows (kills tried,
fuzz examples run, bad inputs checked). With ``GRAFTLAB_RESULTS=DIR`` set (``bench/run_all.py``
sets it to ``bench/results``), the suites that count them write ``DIR/<name>.json`` in the shape
of every other result (``bench/common.write_result``: machine, command, date); without it they
write nothing.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def _bench_common():
    spec = importlib.util.spec_from_file_location("graftlab_bench_common", ROOT / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(name: str, payload: dict, command: str) -> Optional[Path]:
    """``$GRAFTLAB_RESULTS/<name>.json`` holding ``payload`` (and the run's machine, date and
    ``command``); None when ``GRAFTLAB_RESULTS`` is not set."""
    out = os.environ.get("GRAFTLAB_RESULTS")
    if not out:
        return None
    common = _bench_common()
    saved, argv = os.environ.get("GRAFTLAB_BENCH_RESULTS"), sys.argv
    os.environ["GRAFTLAB_BENCH_RESULTS"], sys.argv = out, command.split()
    try:
        return common.write_result(name, payload, quick=False)
    finally:
        sys.argv = argv
        if saved is None:
            del os.environ["GRAFTLAB_BENCH_RESULTS"]
        else:
            os.environ["GRAFTLAB_BENCH_RESULTS"] = saved
