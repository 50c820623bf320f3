"""No absolute path of the recording machine in trace metadata (graftlab.trace.portable)."""
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from graftlab import trace
from graftlab.trace.portable import is_absolute_path, portable_path, portable_paths
from graftlab.record.recorder import Recorder
from tests.record.test_recorder import batches, setup, step

ROOT = Path(__file__).resolve().parents[2]


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _metadata_of_every_file(trace_dir: Path):
    yield trace_dir / trace.SIDECAR, json.loads((trace_dir / trace.SIDECAR).read_text())
    for part in trace.part_files(trace_dir):
        yield part, json.loads(pq.read_schema(part).metadata[trace.METADATA_KEY])


@pytest.mark.parametrize("sample", sorted(p.name for p in (ROOT / "sample_traces").iterdir() if p.is_dir()))
def test_sample_traces_hold_no_absolute_path(sample):
    for path, meta in _metadata_of_every_file(ROOT / "sample_traces" / sample):
        bad = [s for s in _strings(meta) if is_absolute_path(s) or "/.venv/" in s]
        assert not bad, f"{path}: {bad}"


def test_portable_path():
    base = Path("/home/me/runs/t.trace")
    assert portable_path("/home/me/.venv/lib/python3.11/site-packages/bible/data/kjv.jsonl", base) == \
        "site-packages/bible/data/kjv.jsonl"
    assert portable_path("/home/me/data/x.npz", base) == "../../data/x.npz"
    assert portable_path("/home/me/runs/t.trace", base) == "."
    assert portable_path("relative/x", base) == "relative/x" and portable_path("/", base) == "/"
    if sys.platform != "win32":
        assert portable_path("C:\\Users\\me\\x.npz", base) == "x.npz"
    assert portable_paths({"a": ["/home/me/y", 1, None], "b": "words / more"}, base) == \
        {"a": ["../../y", 1, None], "b": "words / more"}


def test_recorder_writes_no_absolute_path(tmp_path):
    model, opt = setup()
    data = tmp_path / "data" / "x.txt"
    out = tmp_path / "runs" / "t"
    with Recorder(opt, out, flush_every=2, model=model,
                  metadata={"config": {"data": str(data), "out": str(out)},
                            "task_info": {"source": f"{sys.prefix}/lib/site-packages/pkg/d.json"}}) as rec:
        for x, y in batches(3):
            step(model, opt, x, y)
    files = list(_metadata_of_every_file(out))
    # a /2 part's footer names the sidecar and holds no run metadata; the sidecar holds it once
    assert [p.name for p, meta in files if "config" in meta] == [trace.SIDECAR]
    for path, meta in files:
        assert not [s for s in _strings(meta) if is_absolute_path(s)], path
        if "config" not in meta:
            continue
        assert meta["config"] == {"data": "../../data/x.txt", "out": "."}, path
        assert meta["task_info"]["source"] == "site-packages/pkg/d.json"
        assert not [s for s in _strings(meta) if is_absolute_path(s)]
