"""The trace contract: writing helpers, read_trace vs pandas/polars/duckdb, formats /1 and /2, pruned
step-range reads, and every malformed part refused with one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graftlab import trace
from graftlab.trace import replacing
from graftlab.errors import GraftlabError
from graftlab.trace.scanning import scan_ratios

GROUPS = ["a.weight", "a.bias", "b.weight"]
SAMPLE_V1 = Path(__file__).resolve().parents[2] / "sample_traces" / "bert-adam-sgd-bs16"


def meta(fmt: str = trace.FORMAT) -> dict:
    return {"format": fmt, "granularity": "layer",
            "groups": [{"name": n, "kind": "other", "ffn": None, "block": None, "shape": None, "numel": 1,
                        "members": [n]} for n in GROUPS]}


def stats_for(steps: np.ndarray) -> np.ndarray:
    s = np.empty((len(steps), 3, len(GROUPS)), dtype=np.float32)
    s[:, 0] = (steps[:, None] + 1) * np.array([1.0, 2.0, 3.0]) / 7.0
    s[:, 1] = 2.0 / 3.0
    s[:, 1, 2] = np.where(steps % 4 == 0, 0.0, 2.0 / 3.0)  # D's step zero now and then: ratio inf
    with np.errstate(divide="ignore"):
        s[:, 2] = s[:, 0] / s[:, 1]
    return s


def write_trace(tmp_path, parts=((0, 10), (10, 20), (20, 30)), loss_from=0, fmt=trace.FORMAT, name="t"):
    d = tmp_path / name
    d.mkdir()
    trace.write_sidecar(d, meta(fmt))
    for lo, hi in parts:
        steps = np.arange(lo, hi)
        scalars = {"loss": np.linspace(1, 0, hi - lo).astype(np.float32)} if lo >= loss_from else {}
        trace.write_part(d, trace.build_table(steps, GROUPS, stats_for(steps), scalars, meta(fmt)))
    return d


def test_layout_and_metadata(tmp_path):
    d = write_trace(tmp_path)
    names = sorted(p.name for p in d.iterdir())
    assert names == ["_graftlab.json", "part-000000000000.parquet", "part-000000000010.parquet",
                     "part-000000000020.parquet"]
    assert json.loads((d / "_graftlab.json").read_text()) == meta()
    for p in d.glob("part-*"):
        # /2: the metadata is stored once, in the sidecar; each part holds a marker and no ratio
        assert json.loads(pq.read_schema(p).metadata[trace.METADATA_KEY]) == {
            "format": "graftlab.trace/2", "metadata": "_graftlab.json"}
        assert pq.read_schema(p).names == ["step", "group", "norm_m", "norm_d", "loss"]
        col = pq.ParquetFile(p).metadata.row_group(0).column(2)
        assert "BYTE_STREAM_SPLIT" in col.encodings and col.compression == "ZSTD"
    assert trace.read_metadata(d) == meta()
    assert trace.read_metadata(d / "part-000000000010.parquet") == meta()  # a part finds the sidecar
    assert trace.trace_info(d)["format"] == "graftlab.trace/2"


def test_read_trace_values_types_and_ratio_recomputed_exactly(tmp_path):
    d = write_trace(tmp_path)
    df = trace.read_trace(d)
    assert list(df.columns) == ["step", "group", "norm_m", "norm_d", "ratio", "loss"]
    assert len(df) == 30 * len(GROUPS)
    assert df["step"].dtype == np.int64 and df["ratio"].dtype == np.float32 and df["norm_m"].dtype == np.float32
    assert isinstance(df["group"].dtype, pd.CategoricalDtype)
    assert list(df["group"].cat.categories) == GROUPS  # metadata order
    assert list(df["group"][:3]) == GROUPS and (df["group"] == "a.bias").sum() == 30
    want = np.concatenate([stats_for(np.arange(lo, lo + 10)) for lo in (0, 10, 20)])  # (30, 3, G)
    for i, col in enumerate(("norm_m", "norm_d", "ratio")):
        # bit for bit: the norms are stored losslessly, the ratio is their float32 quotient as recorded
        assert np.array_equal(df[col].to_numpy().reshape(30, -1), want[:, i], equal_nan=True), col
    assert np.isinf(df["ratio"]).sum() == 8  # steps 0, 4, ..., 28 of b.weight
    assert df.attrs["graftlab"]["granularity"] == "layer"


def test_trace_is_readable_by_pandas_polars_and_duckdb(tmp_path):
    polars = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    d = write_trace(tmp_path)
    mine = trace.read_trace(d)
    cols = ["step", "group", "norm_m", "norm_d", "loss"]

    def same(other: pd.DataFrame) -> None:
        other = other.assign(group=other["group"].astype(str)).sort_values(["step", "group"]).reset_index(drop=True)
        ref = mine.assign(group=mine["group"].astype(str)).sort_values(["step", "group"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(other[cols], ref[cols], check_dtype=False)
        ratio = (other["norm_m"].to_numpy(np.float32) / other["norm_d"].to_numpy(np.float32))
        assert np.array_equal(ratio, ref["ratio"].to_numpy(), equal_nan=True)

    with np.errstate(divide="ignore"):
        same(pd.read_parquet(d))
        same(polars.read_parquet(str(d / trace.PART_GLOB)).to_pandas())
        same(duckdb.sql(f"SELECT * FROM read_parquet('{d}/{trace.PART_GLOB}')").df())


def test_v1_traces_are_still_read(tmp_path):
    """The shipped sample traces are graftlab.trace/1: ratio stored, metadata in every footer."""
    assert trace.trace_info(SAMPLE_V1)["format"] == "graftlab.trace/1"
    df = trace.read_trace(SAMPLE_V1, steps=(0, 300))
    pdf = pd.read_parquet(SAMPLE_V1 / "part-000000000000.parquet").iloc[:300 * 59]
    assert np.array_equal(df["ratio"].to_numpy()[: len(pdf)], pdf["ratio"].to_numpy(), equal_nan=True)
    assert trace.read_metadata(SAMPLE_V1)["format"] == "graftlab.trace/1"
    # a /1 trace that is resumed stays /1: the writer follows the metadata's format
    d = write_trace(tmp_path, fmt=trace.FORMAT_1)
    first = d / "part-000000000000.parquet"
    assert "ratio" in pq.read_schema(first).names
    assert json.loads(pq.read_schema(first).metadata[trace.METADATA_KEY]) == meta(trace.FORMAT_1)
    df1 = trace.read_trace(d)
    df2 = trace.read_trace(write_trace(tmp_path, name="t2"))
    pd.testing.assert_frame_equal(df1, df2, check_like=False)
    assert trace.trace_info(d)["columns"] == trace.trace_info(tmp_path / "t2")["columns"]


def test_mixed_formats_are_refused(tmp_path):
    d = write_trace(tmp_path)
    steps = np.arange(30, 40)
    table = trace.build_table(steps, GROUPS, stats_for(steps), meta=meta(trace.FORMAT_1))
    trace.write_part(d, table)
    with pytest.raises(GraftlabError, match="graftlab.trace/1 part in a graftlab.trace/2 trace"):
        trace.read_trace(d)


def test_step_range_reads_only_needed_parts(tmp_path):
    d = write_trace(tmp_path)
    (d / "part-000000000010.parquet").write_bytes(b"not parquet")  # a part the range must not touch
    df = trace.read_trace(d, steps=(20, 25))
    assert sorted(df.step.unique()) == list(range(20, 25))
    df = trace.read_trace(d, steps=(None, 7), groups=["a.bias"])
    assert list(df.step) == list(range(7)) and set(df.group) == {"a.bias"}
    with pytest.raises(GraftlabError):
        trace.read_trace(d)


def test_parts_with_different_scalar_columns(tmp_path):
    d = write_trace(tmp_path, loss_from=10)  # first part has no loss column
    df = trace.read_trace(d)
    assert df["loss"].isna().sum() == 10 * len(GROUPS)
    assert df.loc[df.step >= 10, "loss"].notna().all()


def test_bad_paths(tmp_path):
    with pytest.raises(GraftlabError, match="no such trace"):
        trace.read_trace(tmp_path / "missing")
    with pytest.raises(GraftlabError, match="not a trace"):
        trace.read_trace(tmp_path)
    junk = tmp_path / "x.parquet"
    junk.write_text("hello")
    with pytest.raises(GraftlabError, match="not a readable"):
        trace.read_metadata(junk)
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"step": [0], "group": ["g"]}).to_parquet(plain)
    with pytest.raises(GraftlabError, match="no graftlab metadata"):
        trace.read_trace(plain)


def test_unknown_column(tmp_path):
    d = write_trace(tmp_path)
    with pytest.raises(GraftlabError, match="no column"):
        trace.read_trace(d, columns=["nope"])


# ------------------------------------------------------------------ extent, is_trace, resume helpers

def test_extent_matches_info_and_reads_only_the_end_footers(tmp_path):
    d = write_trace(tmp_path)
    info = trace.trace_info(d)
    assert trace.trace_extent(d) == (info["first_step"], info["last_step"]) == (0, 29)
    assert info["steps"] == 30 and info["parts"] == 3 and "loss" in info["columns"]
    (d / "part-000000000010.parquet").write_bytes(b"not parquet")  # the middle part is never opened
    assert trace.trace_extent(d) == (0, 29)
    single = tmp_path / "one.parquet"
    steps = np.arange(5, 9)
    pq.write_table(trace.build_table(steps, GROUPS, stats_for(steps), meta=meta()), single, write_statistics=False)
    assert trace.trace_extent(single) == (5, 8)  # no statistics: the step column is read instead
    assert trace.trace_info(single)["first_step"] == 5


def test_is_trace(tmp_path):
    d = write_trace(tmp_path)
    assert trace.is_trace(d) and trace.is_trace(d / "part-000000000000.parquet")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert not trace.is_trace(fresh) and not trace.is_trace(tmp_path / "missing")
    trace.write_sidecar(fresh, meta())  # a recording that has not flushed a part yet
    assert trace.is_trace(fresh)
    (tmp_path / "notes.txt").write_text("x")
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"step": [0]}).to_parquet(plain)
    assert not trace.is_trace(tmp_path / "notes.txt") and not trace.is_trace(plain)


def test_temporary_name_is_hidden_from_readers(tmp_path):
    tmp = trace.temporary_name(tmp_path / "part-000000000000.parquet")
    assert tmp.parent == tmp_path and tmp.name.startswith(".")
    assert not tmp.match(trace.PART_GLOB)
    assert tmp != trace.temporary_name(tmp_path / "part-000000000000.parquet")  # random: never predictable


def test_truncate_keeps_earlier_steps_and_drops_half_written_parts(tmp_path):
    d = write_trace(tmp_path)
    half = trace.temporary_name(d / trace.part_name(30))
    half.write_bytes(b"half a part")
    trace.truncate(d, 15)
    assert sorted(p.name for p in d.glob(trace.PART_GLOB)) == ["part-000000000000.parquet", "part-000000000010.parquet"]
    assert not half.exists()
    df = trace.read_trace(d)
    assert sorted(df.step.unique()) == list(range(15))
    assert trace.read_metadata(d / "part-000000000010.parquet") == meta()  # the rewritten part keeps it


def test_prepare_directory_replaces_only_traces(tmp_path):
    from graftlab.errors import OutputExistsError

    d = write_trace(tmp_path)
    with pytest.raises(OutputExistsError, match="pass overwrite=True"):
        trace.prepare_directory(d)
    assert trace.prepare_directory(d, resume=True) == d and trace.is_trace(d)  # kept as it is
    before = sorted(p.name for p in d.iterdir())
    trace.prepare_directory(d, overwrite=True)
    # the old files wait in the hidden backup until the new run's first part (then they go)
    assert [p.name for p in d.iterdir()] == [replacing.BACKUP] and not trace.is_trace(d)
    replacing.restore(d)
    assert sorted(p.name for p in d.iterdir()) == before
    trace.prepare_directory(d, overwrite=True)
    replacing.discard(d)
    assert d.is_dir() and not any(d.iterdir())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for kw in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(GraftlabError, match="does not hold a graftlab trace"):
            trace.prepare_directory(mine, **kw)
    assert (mine / "notes.txt").read_text() == "keep"
    assert trace.prepare_directory(tmp_path / "new" / "t").is_dir()


# ------------------------------------------------------------------ malformed parts: one line each

def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_copied_part_is_refused_not_counted_twice(tmp_path):
    d = write_trace(tmp_path)
    shutil.copy(d / "part-000000000010.parquet", d / "part-000000000010 (1).parquet")
    for read in (trace.read_trace, trace.trace_info, trace.trace_extent, trace.read_metadata):
        with pytest.raises(GraftlabError, match=r"'part-000000000010 \(1\).parquet' is not a part name") as e:
            read(d)
        one_line(e)


@pytest.mark.parametrize("copy_to,match", [
    ("part-000000000015.parquet", "named for step 15 but holds step 10"),   # a renamed copy
    ("part-000000000005.parquet", "steps 10..19 are also in part-000000000005.parquet"),
])
def test_duplicated_steps_are_refused(tmp_path, copy_to, match):
    d = write_trace(tmp_path)
    shutil.copy(d / "part-000000000010.parquet", d / copy_to)
    for read in (trace.read_trace, trace.trace_info):
        with pytest.raises(GraftlabError, match=match) as e:
            read(d)
        one_line(e)


def test_rows_held_twice_inside_a_part_are_refused(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    trace.write_sidecar(d, meta())
    steps = np.array([0, 1, 1, 2])
    trace.write_part(d, trace.build_table(steps, GROUPS, stats_for(steps), meta=meta()))
    with pytest.raises(GraftlabError, match="step 1 of group 'a.weight' appears more than once"):
        trace.read_trace(d)


def rewrite_part(path: Path, fn) -> None:
    table = fn(pq.read_table(path))
    pq.write_table(table, path)


@pytest.mark.parametrize("fmt,part,edit,match", [
    # a /1 part without ratio: refused, not filled with NaN
    (trace.FORMAT_1, 10, lambda t: t.drop_columns(["ratio"]), "part-000000000010.parquet: lacks required column"),
    (trace.FORMAT, 10, lambda t: t.drop_columns(["norm_m"]), "lacks required column.s. norm_m"),
    # a first part without step: refused, not NaN steps
    (trace.FORMAT, 0, lambda t: t.drop_columns(["step"]), "part-000000000000.parquet: lacks required column.s. step"),
    (trace.FORMAT, 10, lambda t: t.set_column(0, "step", t.column("step").cast(pa.string())),
     "column step is string, not an integer column"),
    (trace.FORMAT, 0, lambda t: t.set_column(1, "group", pa.array(np.zeros(t.num_rows, np.int64))),
     "column group is int64, not a string column"),
    (trace.FORMAT, 20, lambda t: t.set_column(2, "norm_m", t.column("norm_m").cast(pa.string())),
     "column norm_m is string, not a float column"),
])
def test_malformed_parts_give_one_line(tmp_path, fmt, part, edit, match):
    d = write_trace(tmp_path, fmt=fmt)
    rewrite_part(d / trace.part_name(part), edit)
    for read in (trace.read_trace, trace.trace_info):
        with pytest.raises(GraftlabError, match=match) as e:
            read(d)
        one_line(e)


def test_footer_with_a_name_that_is_not_utf8(tmp_path):
    d = write_trace(tmp_path)
    p = d / "part-000000000010.parquet"
    raw = bytearray(p.read_bytes())
    footer = len(raw) - 8 - int.from_bytes(raw[-8:-4], "little")
    at = raw.find(b"norm_d", footer)  # the footer's schema element (before the row groups' copies)
    raw[at + 1] = 0xEF  # "n\xefrm_d": not UTF-8
    p.write_bytes(bytes(raw))
    for read in (trace.read_trace, trace.trace_info, trace.is_trace):
        if read is trace.is_trace:
            assert not read(p)
            continue
        with pytest.raises(GraftlabError, match="part-000000000010.parquet: (not a readable Parquet file|damaged)") as e:
            read(d)
        one_line(e)


def test_missing_sidecar_of_a_v2_trace(tmp_path):
    d = write_trace(tmp_path)
    (d / trace.SIDECAR).unlink()
    # read as part files copied without it: a table whose metadata is inferred
    assert trace.read_metadata(d)["foreign"]["orphan"]
    assert len(trace.read_trace(d)) > 0
    # streamed as such a table too (the whole-trace schedule reads this way)
    batches, codes, meta = scan_ratios(d)
    rows = sum(len(s) for s, _, _ in batches)
    assert meta["foreign"]["orphan"] and rows == len(trace.read_trace(d))


def flip_one_bit(raw: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(raw)
    out[int(rng.integers(len(out)))] ^= 1 << int(rng.integers(8))
    return bytes(out)


def test_bit_flips_are_errors_not_altered_data(tmp_path):
    """A flipped bit anywhere in a part: the read fails (page checksums, footer checks) or returns
    the same rows (a bit nobody reads). bench/bitflip.py runs this over 1000 files."""
    d = write_trace(tmp_path, parts=((0, 40),))
    part = d / "part-000000000000.parquet"
    raw = part.read_bytes()
    ref = trace.read_trace(d)
    rng = np.random.default_rng(0)
    outcome = {"error": 0, "same": 0, "altered": 0}
    for _ in range(150):
        part.write_bytes(flip_one_bit(raw, rng))
        try:
            df = trace.read_trace(d)
        except GraftlabError:
            outcome["error"] += 1
            continue
        same = df.equals(ref) and list(df.columns) == list(ref.columns)
        outcome["same" if same else "altered"] += 1
    assert outcome["altered"] == 0, outcome
    assert outcome["error"] >= 100, outcome  # the rest hit bytes no reader uses (statistics, padding)


def test_writes_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    import os

    from graftlab.io import fsutil

    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").exists() else fd))
        return real_fsync(fd)

    def replace(a, b):
        calls.append(("replace", str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    d = write_trace(tmp_path, parts=((0, 10),))
    part = str(d / "part-000000000000.parquet")
    i = calls.index(("replace", part))
    if Path("/proc/self/fd").exists():
        tmp_part = fsutil.temporary_pattern(r"part-000000000000\.parquet")
        assert calls[i - 1][0] == "fsync" and tmp_part.fullmatch(Path(calls[i - 1][1]).name)  # the data first
        assert calls[i + 1] == ("fsync", str(d))  # then the rename
        side = fsutil.temporary_pattern(trace.SIDECAR.replace(".", r"\."))
        assert any(c == "fsync" and side.fullmatch(Path(str(f)).name) for c, f in calls)
    out = tmp_path / "x.json"
    fsutil.atomic_write(out, "hello")
    assert out.read_text() == "hello" and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".x")) == []
    with pytest.raises(RuntimeError):
        with fsutil.atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert out.read_text() == "hello" and not tmp.exists()


def test_bit_flips_in_parts_without_checksums_still_give_one_line(tmp_path):
    """Parts written before checksums (the shipped /1 traces): a flip may go unnoticed in the data,
    but a reader never fails with anything other than a GraftlabError."""
    d = write_trace(tmp_path, parts=((0, 40),))
    part = d / "part-000000000000.parquet"
    table = pq.read_table(part)
    pq.write_table(table, part, write_page_checksum=False)
    raw = part.read_bytes()
    rng = np.random.default_rng(1)
    from graftlab.distill.medians import read_grid

    for _ in range(150):
        part.write_bytes(flip_one_bit(raw, rng))
        for read in (trace.read_trace, trace.trace_info, read_grid):
            try:
                read(d)
            except GraftlabError as err:
                one_line(type("E", (), {"value": err}))


def test_readme_snippet_reads_a_recorded_trace_with_pandas_polars_and_duckdb(tmp_path, monkeypatch):
    """README's "Versions and contracts" block, run as written on a trace the Recorder wrote (its
    folder also holds the sidecar and the writer's lock file): each reader's ratio is read_trace's."""
    pytest.importorskip("polars")
    pytest.importorskip("duckdb")
    import re

    import torch

    import graftlab

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Versions and contracts"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    graft = graftlab.Graft(torch.optim.Adam(model.parameters(), 1e-2), torch.optim.SGD(model.parameters(), 0.1),
                           names=model)
    (tmp_path / "runs").mkdir()
    # runs/t: the trace the README's `graftlab record ... --out runs/t` writes
    with graftlab.Recorder(graft, tmp_path / "runs" / "t", flush_every=3, model=model):
        for _ in range(7):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            graft.step()
            graft.zero_grad()
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(code, ns)
    mine = trace.read_trace("runs/t")
    want = mine["ratio"].to_numpy()
    order = {g: i for i, g in enumerate(mine.group.cat.categories)}  # read_trace's rows: step, then group order
    for other in (ns["df"], ns["lf"].to_pandas(), ns["rel"].df()):
        other = other.assign(pos=other["group"].astype(str).map(order)).sort_values(["step", "pos"])
        assert len(other) == len(mine) and np.array_equal(other["ratio"].to_numpy(np.float32), want)
