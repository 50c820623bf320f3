"""Fuzzing the two readers of user files, ``load_corrections`` and ``read_trace``, with hypothesis.

Whatever the file holds, the reader either returns a value that keeps the contract or raises one
:class:`GraftlabError`; nothing else escapes (no KeyError, RecursionError, OverflowError, ...).

The normal suite runs the ``ci`` profile (a few hundred cases in all); ``GRAFTLAB_FUZZ=full`` runs
ten times more examples per property::

    GRAFTLAB_FUZZ=full OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/cli/test_bad_inputs_fuzz.py -s

Trace files here are malformed in every way the reader owns (metadata, columns missing from the
whole trace, values, names, filters); the file-level defects that graftlab.trace's storage layer
checks (page checksums, truncated footers, parts that disagree on their columns or types) have
their own tests beside that code.
"""
from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from graftlab.corrections import load_corrections, save
from graftlab.errors import GraftlabError
from graftlab.trace import FORMAT, METADATA_KEY, READABLE_FORMATS, REQUIRED, part_name, read_trace
from tests import results

PROFILES = {"ci": 60, "full": 2000}
for _name, _n in PROFILES.items():
    settings.register_profile(f"graftlab-{_name}", max_examples=_n, deadline=None, database=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("GRAFTLAB_FUZZ", "ci")
if PROFILE not in PROFILES:
    raise ValueError(f"GRAFTLAB_FUZZ must be one of {', '.join(PROFILES)}, got {PROFILE!r}")
settings.load_profile(f"graftlab-{PROFILE}")
RUN: dict[str, int] = {}  # examples each property ran (hypothesis calls the body once per example)


def counted(test):
    """Count the examples hypothesis runs through ``test`` (under @given, above the body)."""
    @functools.wraps(test)
    def body(*args, **kwargs):
        RUN[test.__name__] = RUN.get(test.__name__, 0) + 1
        return test(*args, **kwargs)
    return body


@pytest.fixture(scope="module", autouse=True)
def _count_examples():
    """After the module: the examples run, written for the README's reliability table when
    ``GRAFTLAB_RESULTS`` is set (tests/results.py)."""
    yield
    if RUN:
        results.write("fuzz", {"profile": PROFILE, "max_examples": PROFILES[PROFILE], "examples": dict(RUN),
                               "total": sum(RUN.values()), "properties": len(RUN)},
                      f"GRAFTLAB_FUZZ={PROFILE} python -m pytest tests/cli/test_bad_inputs_fuzz.py")

# ------------------------------------------------------------------------------------ corrections

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                          max_leaves=20)
factor = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10), st.just(10**400),
                   st.just(1e308), st.just(True), st.text(max_size=3), st.none())
start = st.one_of(st.integers(-3, 50), st.just(10**400), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=2))
group_name = st.one_of(st.sampled_from(["global", "a", "b.weight", ""]), st.text(max_size=10))
record = st.dictionaries(st.sampled_from(["kind", "block", "tied", "median", "factor", "n_finite", "n_nonfinite",
                                          "later_median", "drift", "flags", "stand_in", "members", "other"]),
                         json_value, max_size=5)
near_valid = st.fixed_dictionaries(
    {"format": st.one_of(st.just("graftlab.corrections/1"), st.sampled_from(["graftlab.corrections/2", "x", ""]),
                         json_leaf)},
    optional={
        "multipliers": st.one_of(st.dictionaries(group_name, factor, max_size=4), json_value),
        "schedule": st.one_of(st.dictionaries(group_name, st.lists(st.one_of(st.tuples(start, factor).map(list),
                                                                             json_value), max_size=4), max_size=3),
                              json_value),
        "source": st.one_of(st.fixed_dictionaries({}, optional={"groups": st.dictionaries(group_name, record,
                                                                                          max_size=3),
                                                                "direction_lr": json_leaf}), json_value),
    },
)


def _check_corrections(path: Path) -> None:
    try:
        corr = load_corrections(path)
    except GraftlabError:
        return
    for f in corr.multipliers.values():
        assert isinstance(f, float) and math.isfinite(f) and f > 0
    for pieces in corr.schedule.values():
        starts = [s for s, _ in pieces]
        assert starts[0] == 0 and all(isinstance(s, int) for s in starts) and starts == sorted(set(starts))
        assert all(isinstance(f, float) and math.isfinite(f) and f > 0 for _, f in pieces)
    corr.summary()  # the typed records are readable
    again = path.with_name("again.json")
    save(corr, again)  # what was read writes back and reads the same
    back = load_corrections(again)
    assert back.multipliers == corr.multipliers and back.schedule == corr.schedule


@given(st.binary(max_size=300))
@counted
def test_load_corrections_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.json"
        path.write_bytes(data)
        _check_corrections(path)


@given(json_value)
@counted
def test_load_corrections_arbitrary_json(value):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.json"
        path.write_text(json.dumps(value))
        _check_corrections(path)


@given(near_valid, st.integers(0, 3))
@example({"format": "graftlab.corrections/1", "multipliers": {"global": 10**400}}, 0)  # found: OverflowError
@example({"format": "graftlab.corrections/1", "schedule": {"global": [[0, 1], [10**400, 2]]}}, 0)
@counted
def test_load_corrections_near_valid(data, nesting):
    text = json.dumps(data)
    text = "[" * nesting * 4000 + text + "]" * nesting * 4000  # deep nesting (4000+ levels) on some
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.json"
        path.write_text(text)
        _check_corrections(path)


# ------------------------------------------------------------------------------------------ traces

names = st.lists(st.text(min_size=0, max_size=6), min_size=1, max_size=4, unique=True)
FUTURE_TRACE_FORMATS = ["graftlab.trace/3", "graftlab.trace/10", "graftlab.trace/2.1"]
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def metadata(draw, groups):
    kind = draw(st.sampled_from(["valid", "junk", "none", "json-list", "other-format", "future", "bad-groups"]))
    meta = {"format": FORMAT, "granularity": "layer", "groups": [{"name": g} for g in groups], "every": 1}
    if kind == "valid":
        return json.dumps(meta).encode()
    if kind == "junk":
        return draw(st.binary(max_size=20))
    if kind == "none":
        return None
    if kind == "json-list":
        return json.dumps([1, 2]).encode()
    if kind == "other-format":
        return json.dumps({**meta, "format": draw(json_leaf)}).encode()
    if kind == "future":  # a format a later graftlab may write: refused, never guessed at
        return json.dumps({**meta, "format": draw(st.sampled_from(FUTURE_TRACE_FORMATS))}).encode()
    return json.dumps({**meta, "groups": draw(json_value)}).encode()


@st.composite
def trace_parts(draw):
    """(metadata bytes, [(first step, table)]): one to three parts with the same columns."""
    groups = draw(names)
    meta = draw(metadata(groups))
    drop = draw(st.sets(st.sampled_from(REQUIRED), max_size=1)) if draw(st.integers(0, 5)) == 0 else set()
    extras = draw(st.lists(st.sampled_from(["lr", "loss", "x"]), unique=True, max_size=2))
    parts = []
    first = draw(st.integers(0, 10))
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(0, 6))
        steps = draw(st.lists(st.integers(-5, 2**40), min_size=n, max_size=n))
        rows = {"step": pa.array(steps, pa.int64()),
                "group": pa.array([draw(st.sampled_from(groups + ["other"])) for _ in range(n)], pa.string()),
                **{c: pa.array(draw(st.lists(floats32, min_size=n, max_size=n)), pa.float32())
                   for c in ("norm_m", "norm_d", "ratio", *extras)}}
        table = pa.table({k: v for k, v in rows.items() if k not in drop})
        if meta is not None:
            table = table.replace_schema_metadata({METADATA_KEY: meta})
        parts.append((first, table))
        first += draw(st.integers(1, 20))
    return meta, parts


def _format(meta: Optional[bytes]) -> object:
    try:
        value = json.loads(meta)
    except (TypeError, ValueError):
        return None
    return value.get("format") if isinstance(value, dict) else None


def _empty_part(meta: bytes):
    table = pa.table({"step": pa.array([], pa.int64()), "group": pa.array([], pa.string()),
                      **{c: pa.array([], pa.float32()) for c in ("norm_m", "norm_d", "ratio")}})
    return meta, [(0, table.replace_schema_metadata({METADATA_KEY: meta}))]


def _written(d: Path, parts, single_file: bool) -> Path:
    if single_file:
        pq.write_table(parts[0][1], d / "t.parquet")
        return d / "t.parquet"
    t = d / "t"
    t.mkdir()
    for first, table in parts:
        pq.write_table(table, t / part_name(first))
    return t


@given(trace_parts(), st.booleans(), st.one_of(st.none(), st.tuples(st.one_of(st.none(), st.integers(-5, 40)),
                                                                     st.one_of(st.none(), st.integers(-5, 40)))),
       st.one_of(st.none(), st.lists(st.text(max_size=4), max_size=3)))
@example(_empty_part(json.dumps({"format": FORMAT, "groups": [{"name": "a"}]}).encode()), False, None, [])  # found
@example(_empty_part(json.dumps({"format": FORMAT, "groups": [None]}).encode()), False, None, None)  # found
@counted
def test_read_trace_malformed_traces(parts_, single_file, steps, groups):
    meta, parts = parts_
    with tempfile.TemporaryDirectory() as d:
        path = _written(Path(d), parts, single_file)
        try:
            df = read_trace(path, steps=steps, groups=groups)
        except GraftlabError:
            return
    assert _format(meta) not in FUTURE_TRACE_FORMATS, "a trace of a format this graftlab does not know was read"
    assert {"step", "group", "ratio"} <= set(df.columns)  # norm_m, norm_d too unless a foreign table (no metadata)
    assert meta is None or set(REQUIRED) <= set(df.columns)
    step = df["step"].to_numpy()
    assert step.dtype == np.int64 and (np.diff(step) >= 0).all()  # sorted by step
    lo, hi = steps if steps is not None else (None, None)
    assert lo is None or (step >= lo).all()
    assert hi is None or (step < hi).all()
    if groups is not None:
        assert set(df["group"]) <= set(groups)
    assert isinstance(df.attrs["graftlab"], dict)


@given(st.binary(min_size=0, max_size=200), st.booleans())
@counted
def test_read_trace_files_that_are_not_parquet(data, in_folder):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("t" if in_folder else "t.parquet")
        target = path / part_name(0) if in_folder else path
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(data)
        with pytest.raises(GraftlabError):
            read_trace(path)


file_name = st.text(max_size=12).filter(lambda s: "/" not in s and "\x00" not in s and s not in ("", ".", ".."))


@given(st.one_of(file_name, st.integers(0, 10**12 - 1).map(part_name)))
@counted
def test_read_trace_odd_folder_contents(name):
    """A trace folder holding a file of any name (a part's included) that is not a trace part."""
    with tempfile.TemporaryDirectory() as d:
        t = Path(d) / "t"
        t.mkdir()
        (t / name).write_text("not a part")
        try:
            df = read_trace(t)
        except GraftlabError:
            return
    raise AssertionError(f"a folder holding only {name!r} (not a part) read as a trace of {len(df)} rows")


# ------------------------------------------------------------------------ formats not yet written

@pytest.mark.parametrize("fmt", FUTURE_TRACE_FORMATS)
@pytest.mark.parametrize("stored", ["sidecar", "part"])
def test_a_trace_of_a_future_format_is_refused_by_name(tmp_path, capsys, fmt, stored):
    """A trace whose sidecar or part names a format after this graftlab's: reading refuses with one
    error naming the format and the formats it reads; `graftlab info` prints one error line, exit 2."""
    from graftlab.cli.app import run
    from graftlab.trace import FORMAT_1, SIDECAR
    from tests.trace_builder import metadata, write_trace

    steps = np.arange(4)
    path = write_trace(tmp_path / "t", metadata([{"name": "a"}, {"name": "b"}]), steps, np.ones((4, 2)),
                       fmt=FORMAT_1 if stored == "part" else FORMAT)
    assert len(read_trace(path)) == 8  # readable as written
    if stored == "sidecar":
        meta = json.loads((path / SIDECAR).read_text())
        (path / SIDECAR).write_text(json.dumps({**meta, "format": fmt}))
    else:  # a /1 trace keeps its metadata in each part's footer, and its sidecar says the same
        (path / SIDECAR).unlink()
        part = next(path.glob("*.parquet"))
        table = pq.read_table(part)
        meta = json.loads(table.schema.metadata[METADATA_KEY])
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps({**meta, "format": fmt})}), part)
    with pytest.raises(GraftlabError, match=rf"{fmt}.*not one this graftlab reads") as err:
        read_trace(path)
    assert all(f in str(err.value) for f in READABLE_FORMATS)
    capsys.readouterr()
    assert run(["info", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fmt in lines[0], captured.err


def test_a_corrections_file_of_a_future_format_is_refused_by_name(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": "graftlab.corrections/2", "multipliers": {"global": 2.0}}))
    with pytest.raises(GraftlabError, match=r"corrections format graftlab\.corrections/2 is not one this graftlab "
                                            r"reads \(graftlab\.corrections/1\)"):
        load_corrections(path)
