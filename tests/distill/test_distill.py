"""distill on contract-format traces: the paper's Table 5 -> Table 6b, schedules, and bad inputs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from graftlab.cli.app import app
from graftlab.corrections import load_corrections
from graftlab.distill.pipeline import default_output, distill
from graftlab.trace import trace_extent
from graftlab.trace import read_trace
from graftlab.errors import GraftlabError
from tests.trace_builder import metadata, write_trace

ROOT = Path(__file__).resolve().parents[2]

# The paper's Table 5 (BERT-Large, batch 8K): medians of Adam#SGD ratios over the first 2000 steps.
# (name, kind, block, median, D500 value of Table 6b / the rule)
OUTSIDE = [
    ("bert.embeddings.LayerNorm.bias", "norm", 9.10, 1),
    ("bert.embeddings.LayerNorm.weight", "norm", 16.34, 10),
    ("bert.embeddings.position_embeddings.weight", "embedding", 18.83, 10),
    ("bert.embeddings.token_type_embeddings.weight", "embedding", 0.45, 0.1),
    ("bert.embeddings.word_embeddings.weight", "embedding", 312.94, 100),
    ("bert.pooler.dense.bias", "output", 32.69, 10),
    ("bert.pooler.dense.weight", "output", 48.73, 10),
    ("cls.predictions.bias", "output", 479.54, 100),
    ("cls.predictions.transform.LayerNorm.bias", "output", 21.78, 10),
    ("cls.predictions.transform.LayerNorm.weight", "output", 17.19, 10),
    ("cls.predictions.transform.dense.bias", "output", 48.04, 10),
    ("cls.predictions.transform.dense.weight", "output", 62.77, 10),  # MLM pre-LN ("softmax")
    ("cls.seq_relationship.bias", "output", 0.66, 0.1),
    ("cls.seq_relationship.weight", "output", 2.00, 1),
]
# Per-layer groups: layer 1 and layer 24 weights, the table's bias/LayerNorm values.
LAYER = [
    ("attention.self.query.weight", "Q", (525.50, 1090.10)),
    ("attention.self.key.weight", "K", (466.59, 1081.26)),
    ("attention.self.value.weight", "V", (48.61, 193.95)),
    ("attention.output.dense.weight", "attn_out", (56.17, 213.22)),
    ("intermediate.dense.weight", "ffn", (82.02, 216.04)),
    ("output.dense.weight", "ffn", (71.84, 218.14)),
    ("attention.self.query.bias", "Q", (378.07, 378.07)),
    ("attention.self.key.bias", "K", (154101.58, 154101.58)),
    ("attention.self.value.bias", "V", (37.69, 37.69)),
    ("attention.output.dense.bias", "attn_out", (21.92, 21.92)),
    ("intermediate.dense.bias", "ffn", (81.30, 81.30)),
    ("output.dense.bias", "ffn", (23.87, 23.87)),
    ("attention.output.LayerNorm.bias", "norm", (21.60, 21.60)),
    ("attention.output.LayerNorm.weight", "norm", (41.99, 41.99)),
    ("output.LayerNorm.bias", "norm", (22.05, 22.05)),
    ("output.LayerNorm.weight", "norm", (45.42, 45.42)),
]
BLOCKS = (0, 23)


def table5_groups():
    groups = [dict(name=n, kind=k, block=None, median=m, want=w) for n, k, m, w in OUTSIDE]
    for i, b in enumerate(BLOCKS):
        for leaf, k, meds in LAYER:
            groups.append(dict(name=f"bert.encoder.layer.{b}.{leaf}", kind=k, block=b, median=meds[i], want=500))
    return groups


def series_with_median(rng, median, n, n_bad):
    """n values (n - n_bad finite, odd count) whose finite median is exactly ``median`` (in float32)."""
    k = n - n_bad
    assert k % 2 == 1
    half = rng.uniform(0.01, 1.5, size=k // 2)
    vals = np.concatenate([median * 10.0 ** -half, [median], median * 10.0 ** half])
    vals = np.concatenate([vals, rng.choice([np.nan, np.inf], size=n_bad)])
    return rng.permutation(vals)


def build_table5(path, n_steps=4000, window=2000):
    rng = np.random.default_rng(5)
    groups = table5_groups()
    ratios = np.empty((n_steps, len(groups)))
    for j, g in enumerate(groups):
        m = np.float32(g["median"]).item()
        ratios[:window, j] = series_with_median(rng, m, window, n_bad=int(rng.integers(1, 40)) * 2 + 1)
        # after the window: 1000x the values, with NaNs, so reading past the window would show
        later = m * 1000 * rng.uniform(0.5, 2, size=n_steps - window)
        later[::7] = np.nan
        ratios[window:, j] = later
    meta = metadata([{k: g[k] for k in ("name", "kind", "block")} for g in groups], d_lr=0.05)
    write_trace(path, meta, np.arange(n_steps), ratios, part_steps=400, row_group_steps=100)
    return groups, ratios


runner = CliRunner()


def cli(*args):
    return runner.invoke(app, ["distill", *map(str, args)])


def test_table5_to_table6b_through_the_cli(tmp_path):
    trace = tmp_path / "bert.trace"
    groups, ratios = build_table5(trace)
    res = cli(trace, "--window", 2000, "--round", "D500")
    assert res.exit_code == 0, res.output
    out = default_output(trace)
    assert out == tmp_path / "bert.trace.corrections.json"
    corr = load_corrections(out)
    assert corr.schedule == {}
    assert set(corr.multipliers) == {g["name"] for g in groups}
    for g in groups:
        assert corr.multipliers[g["name"]] == g["want"], g["name"]
    # Table 6b's rows by name
    m = corr.multipliers
    assert m["bert.embeddings.position_embeddings.weight"] == 10
    assert m["bert.embeddings.word_embeddings.weight"] == 100
    assert m["cls.predictions.transform.dense.weight"] == 10
    for b in BLOCKS:
        for leaf in ("query", "key", "value"):
            assert m[f"bert.encoder.layer.{b}.attention.self.{leaf}.weight"] == 500
    # medians and counts recorded, non-finite skipped and counted
    info = corr.group_sources
    raw = json.loads(out.read_text())["source"]["groups"]  # the file's form of the records
    assert list(raw["bert.encoder.layer.0.attention.self.key.bias"]) == [
        "kind", "block", "tied", "median", "factor", "n_finite", "n_nonfinite", "later_median", "drift", "flags",
        "stand_in", "grad_share", "evidence"]
    assert "stand_in" not in raw["bert.embeddings.word_embeddings.weight"]
    assert "evidence" not in raw["bert.embeddings.word_embeddings.weight"]
    for j, g in enumerate(groups):
        first = ratios[:2000, j]
        assert info[g["name"]].median == pytest.approx(np.float32(g["median"]), rel=1e-6)
        assert info[g["name"]].n_finite == np.isfinite(first).sum()
        assert info[g["name"]].n_nonfinite == (~np.isfinite(first)).sum()
    # the K bias is the only degenerate group (the paper's 154101 artifact)
    flagged = {n for n, d in info.items() if d.flags}
    assert flagged == {f"bert.encoder.layer.{b}.attention.self.key.bias" for b in BLOCKS}
    # medians only (no norm_g): a key bias 330x its own weight's median; Q/K weights up to 1090 kept
    ev = info["bert.encoder.layer.0.attention.self.key.bias"].evidence
    assert ev["basis"] == "structure" and ev["sibling"] == "bert.encoder.layer.0.attention.self.key.weight"
    assert ev["sibling_factor"] == pytest.approx(154101.58 / 466.59, rel=1e-6)
    assert info["bert.encoder.layer.0.attention.self.key.bias"].grad_share is None
    assert info["bert.encoder.layer.23.attention.self.query.weight"].block == 23
    assert info["bert.embeddings.word_embeddings.weight"].block is None
    assert corr.source["direction_lr"] == 0.05 and corr.source["round"] == "D500"
    assert corr.source["window"] == 2000 and corr.source["mode"] == "static"
    # drift: median of the last 2000 steps (about 1000x higher) over the first window's
    for j, g in enumerate(groups):
        last = ratios[2000:, j].astype(np.float32)
        want = np.median(last[np.isfinite(last)]) / np.float32(g["median"])
        assert info[g["name"]].drift == pytest.approx(want, rel=1e-5)
        assert 500 < want < 2000
    assert "word_embeddings" in res.output and "degenerate" in res.output and "wrote" in res.output

    # none / pow10 on the same trace
    res = cli(trace, "--window", 2000, "--round", "pow10", "-o", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    p = load_corrections(tmp_path / "p.json").multipliers
    assert p["bert.embeddings.word_embeddings.weight"] == 100
    assert p["bert.encoder.layer.23.attention.self.query.weight"] == 1000
    # the flagged K bias takes the median of its kind's other groups (K weights), then pow10
    assert p["bert.encoder.layer.0.attention.self.key.bias"] == 100
    res = cli(trace, "--window", 2000, "--round", "none", "-o", tmp_path / "n.json", "--format", "json")
    n = load_corrections(tmp_path / "n.json").multipliers
    assert n["bert.embeddings.word_embeddings.weight"] == pytest.approx(312.94, rel=1e-6)
    assert n["bert.encoder.layer.0.attention.self.key.bias"] == pytest.approx(np.median([466.59, 1081.26]), rel=1e-6)


def test_tie_regex_and_csv(tmp_path):
    trace = tmp_path / "bert.trace"
    build_table5(trace)
    res = cli(trace, "--round", "D250", "--tie", r"attention\.self", "--format", "csv")
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "bert.trace.corrections.csv")
    assert list(df.columns) == ["group", "kind", "factor"]
    f = df.set_index("group")["factor"]
    assert f["bert.encoder.layer.0.attention.self.query.weight"] == 250
    assert f["bert.encoder.layer.0.intermediate.dense.weight"] == 10  # not tied by the regex: 82.02 -> 10
    assert df.set_index("group")["kind"]["bert.encoder.layer.0.attention.self.value.weight"] == "V"


def test_filter_option_changes_values_not_counts(tmp_path):
    trace = tmp_path / "t.trace"
    rng = np.random.default_rng(0)
    ratios = rng.lognormal(size=(300, 2))
    ratios[5, 0] = np.inf
    write_trace(trace, metadata([{"name": "a"}, {"name": "b"}]), np.arange(300), ratios, part_steps=100)
    plain = distill(trace, window=100)
    filt = distill(trace, window=100, filter=51)
    assert filt.source["filter"] == 51
    assert filt.group_sources["a"].n_nonfinite == 1
    from graftlab.distill.analysis import median_filter
    # the filter runs over the series (the half width past the window included), then the window's median
    series = np.where(np.isfinite(ratios[:125, 0]), ratios[:125, 0], np.nan)
    want = np.median(median_filter(series, 51)[:100][np.isfinite(ratios[:100, 0])])
    assert filt.multipliers["a"] == pytest.approx(want, rel=1e-6)
    assert filt.multipliers["a"] != plain.multipliers["a"]


@pytest.mark.parametrize("start", [0, 37])
def test_filtered_static_factor_is_the_schedules_first_piece(tmp_path, start):
    trace = tmp_path / "t.trace"
    ratios = np.random.default_rng(1).lognormal(size=(300, 2))
    write_trace(trace, metadata([{"name": "a"}, {"name": "b"}]), np.arange(300), ratios, part_steps=100)
    static = distill(trace, window=60, filter=21, start=start, schedule=False)
    sched = distill(trace, window=60, filter=21, start=start, schedule=True)
    for g in ("a", "b"):
        assert static.multipliers[g] == pytest.approx(sched.schedule[g][0][1], rel=1e-12)


def test_global_trace_gives_a_schedule(tmp_path):
    trace = tmp_path / "g.trace"
    n = 1000
    steps = np.arange(n)
    base = np.where(steps < 400, 0.02, np.where(steps < 800, 0.05, 0.2))
    rng = np.random.default_rng(1)
    ratios = (base * rng.uniform(0.9, 1.1, size=n)).reshape(-1, 1)
    ratios[::50, 0] = np.inf
    meta = metadata([{"name": "global"}], granularity="global")
    write_trace(trace, meta, steps, ratios, part_steps=250)
    corr = distill(trace, window=200)
    assert corr.multipliers == {} and list(corr.schedule) == ["global"]
    pieces = corr.schedule["global"]
    assert [s for s, _ in pieces] == [0, 200, 400, 600, 800]
    for s, f in pieces:
        w = ratios[s:s + 200, 0]
        assert f == pytest.approx(np.median(w[np.isfinite(w)].astype(np.float32)), rel=1e-6)
    rounded = distill(trace, window=200, round="pow10")
    assert rounded.schedule["global"] == [[0, 0.01], [800, 0.1]]
    static = distill(trace, window=200, schedule=False)
    assert list(static.multipliers) == ["global"] and static.schedule == {}


def test_every_n_steps_trace_and_start(tmp_path):
    trace = tmp_path / "e.trace"
    steps = np.arange(0, 2000, 10)
    ratios = np.where(steps < 1000, 3.0, 30.0).reshape(-1, 1).repeat(2, axis=1)
    write_trace(trace, metadata([{"name": "a"}, {"name": "b"}], every=10), steps, ratios, part_steps=40)
    assert trace_extent(trace) == (0, 1990)
    assert distill(trace, window=2000).multipliers == {"a": 16.5, "b": 16.5}  # 1990 + every covers 2000
    assert distill(trace, window=1000).multipliers == {"a": 3.0, "b": 3.0}
    assert distill(trace, window=500, start=1000).multipliers == {"a": 30.0, "b": 30.0}
    assert read_trace(trace, steps=(1950, None))["step"].unique().tolist() == [1950, 1960, 1970, 1980, 1990]


def test_window_reads_only_the_parts_it_needs(tmp_path):
    """A first-window distill never opens parts past the window (nor the middle ones for drift)."""
    trace = tmp_path / "big.trace"
    rng = np.random.default_rng(2)
    ratios = rng.lognormal(size=(1000, 3))
    write_trace(trace, metadata([{"name": c} for c in "abc"]), np.arange(1000), ratios, part_steps=100)
    want = distill(trace, window=200, drift=False).multipliers
    for name in ("part-000000000400.parquet", "part-000000000500.parquet"):
        (trace / name).write_bytes(b"garbage")  # would fail if read
    assert distill(trace, window=200).multipliers == want
    assert distill(trace, window=200).group_sources["a"].drift is not None


# ------------------------------------------------------------------ bad inputs: one line, exit != 0

def one_line_error(res, match):
    assert res.exit_code != 0
    assert isinstance(res.exception, GraftlabError), res.output
    msg = str(res.exception)
    assert "\n" not in msg
    assert match in msg, msg
    return msg


def small_trace(path, n=300, **kw):
    ratios = np.full((n, 2), 2.0)
    return write_trace(path, metadata([{"name": "a"}, {"name": "b"}]), np.arange(n), ratios, part_steps=100, **kw)


def test_bad_inputs(tmp_path):
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"x": [1, 2]}).to_parquet(plain)
    # a table from another tool is a trace when it has the columns (tests/trace/test_foreign_traces.py)
    one_line_error(cli(plain), "no graftlab metadata, and a table needs columns step, group, ratio")

    nocol = small_trace(tmp_path / "nocol.trace", drop=("ratio",))
    one_line_error(cli(nocol), "lacks required column(s) ratio")

    empty = tmp_path / "empty.trace"
    empty.mkdir()
    (empty / "_graftlab.json").write_text(json.dumps(metadata([{"name": "a"}])))
    one_line_error(cli(empty), "not a trace")

    zero = tmp_path / "zero.trace"
    zero.mkdir()
    schema = pa.schema([("step", pa.int64()), ("group", pa.string()), ("norm_m", pa.float32()),
                        ("norm_d", pa.float32()), ("ratio", pa.float32())],
                       metadata={b"graftlab": json.dumps(metadata([{"name": "a"}])).encode()})
    pq.write_table(schema.empty_table(), zero / "part-000000000000.parquet")
    one_line_error(cli(zero), "empty")

    short = small_trace(tmp_path / "short.trace")
    msg = one_line_error(cli(short, "--window", 2000), "longer than the trace")
    assert "300 steps" in msg
    one_line_error(cli(short, "--window", 100, "--round", "D0"), "--round 'D0'")
    one_line_error(cli(short, "--window", 100, "--round", "Dabc"), "--round 'Dabc': D<beta>")
    one_line_error(cli(short, "--window", 100, "--filter", 4), "odd")
    one_line_error(cli(tmp_path / "nothing"), "no such trace")

    out = tmp_path / "keep.json"
    out.write_text("precious")
    msg = one_line_error(cli(short, "--window", 100, "-o", out), "already exists")
    assert "pass --overwrite to replace it" in msg and "overwrite=True" not in msg  # said in the CLI's terms
    assert out.read_text() == "precious"
    assert cli(short, "--window", 100, "-o", out, "--overwrite").exit_code == 0
    assert load_corrections(out).multipliers == {"a": 2.0, "b": 2.0}
    assert not (tmp_path / "short.trace.corrections.json").exists()  # no stray outputs from failures


def test_cli_error_line_and_exit_code(tmp_path):
    short = small_trace(tmp_path / "short.trace")
    res = subprocess.run([sys.executable, "-m", "graftlab", "distill", str(short), "--round", "D0", "--window", "10"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: --round 'D0': D<beta> needs a positive finite beta, e.g. D500"]


def test_default_window_fits_a_short_trace_and_says_so(tmp_path):
    short = small_trace(tmp_path / "short.trace")  # 300 steps
    res = cli(short, "-o", tmp_path / "c.json")
    assert res.exit_code == 0, res.output
    assert load_corrections(tmp_path / "c.json").source["window"] == 75  # a quarter of 300 (< 2000)
    assert "window 75 steps: the paper's 2000, capped to the first quarter" in " ".join(res.output.split())
    assert distill(short).source["window"] == 75
    msg = one_line_error(cli(short, "--window", 400, "-o", tmp_path / "d.json"), "longer than the trace")
    assert "--window 400" in msg


def test_bad_round_is_said_before_an_existing_output(tmp_path):
    short = small_trace(tmp_path / "short.trace")
    out = tmp_path / "keep.json"
    out.write_text("precious")
    one_line_error(cli(short, "--round", "D0", "-o", out), "--round 'D0'")
    assert out.read_text() == "precious"


def test_schedule_title_names_the_whole_run(tmp_path):
    short = small_trace(tmp_path / "short.trace")
    res = cli(short, "--schedule", "--window", 50, "-o", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    assert "steps 0..299 in windows of 50" in res.output


def test_info_keeps_long_group_names_on_one_line(tmp_path):
    long = "model.decoder.layers.11.encoder_attn.very_long_projection_name.weight"
    path = tmp_path / "long.trace"
    write_trace(path, metadata([{"name": long}]), np.arange(20), np.ones((20, 1)))
    res = runner.invoke(app, ["info", str(path)], env={"COLUMNS": "60"})
    assert res.exit_code == 0, res.output
    assert long in res.output


def test_schedule_over_a_whole_trace_equals_the_row_by_row_medians(tmp_path):
    """distill --schedule on a recorded trace reads a (groups, steps) grid, not rows: same factors as
    median-filtering each group's rows and taking window medians row by row (the path a foreign
    table, read as rows, takes), drift included."""
    from graftlab.distill import analysis

    n, names = 600, ["w.a", "w.b", "w.c"]
    rng = np.random.default_rng(7)
    steps = np.arange(n)
    ratios = np.exp(rng.normal(size=(n, 3)).cumsum(axis=0) * 0.05) * [1.0, 30.0, 0.01]
    ratios[rng.integers(0, n, 20), rng.integers(0, 3, 20)] = np.inf  # zero D steps: skipped
    path = tmp_path / "t"
    write_trace(path, metadata([{"name": g} for g in names]), steps, ratios, part_steps=100)
    corr = distill(path, window=100, schedule=True, filter=51, start=50)
    rows = analysis.filter_groups(read_trace(path, steps=(50, None)), 51)
    want = analysis.piecewise(analysis.windowed_medians(rows, 100, 50), "median")
    assert corr.schedule.keys() == want.keys()
    for g in names:
        got = corr.schedule[g]
        assert [s for s, _ in got] == [s for s, _ in want[g]], g
        np.testing.assert_allclose([f for _, f in got], [f for _, f in want[g]], rtol=1e-12, err_msg=g)
    last = analysis.window_medians(rows, 100, 500).set_index("group")["median"]
    for g in names:
        assert corr.group_sources[g].later_median == pytest.approx(last[g], rel=1e-12)
    # the same rows as another tool's table (no metadata) take the row-by-row path: same schedule
    plain = tmp_path / "plain.parquet"
    read_trace(path)[["step", "group", "norm_m", "norm_d", "ratio"]].astype({"group": str}).to_parquet(plain)
    assert distill(plain, window=100, schedule=True, filter=51, start=50).schedule == corr.schedule


def test_a_trace_that_starts_late_says_where_it_starts_and_sizes_the_default_window_from_its_steps(tmp_path):
    import torch

    from graftlab import Graft, Recorder

    model = torch.nn.Linear(4, 3)
    graft = Graft(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1), names=model)
    torch.manual_seed(0)
    with Recorder(graft, tmp_path / "t", start_step=1000):
        for _ in range(40):
            model(torch.randn(2, 4)).sum().backward()
            graft.step()
            graft.zero_grad()
    with pytest.raises(GraftlabError, match=r"holds steps 1000\.\.1039: pass start=1000") as err:
        distill(tmp_path / "t")
    assert err.value.params == ("start",)
    corr = distill(tmp_path / "t", start=1000)
    assert corr.source["window"] == 10 and corr.source["start"] == 1000  # a quarter of the 40 steps held


def test_a_schedule_follows_a_groups_own_medians_after_a_first_window_without_one(tmp_path):
    """A group with no finite ratio in the first window (frozen at first) takes the stand-in there,
    as the static factor does, and its own medians in the windows where it has them."""
    rows = []
    for s in range(8):
        rows += [(s, "encoder.layer.0.attention.self.query.weight", 50.0),
                 (s, "encoder.layer.1.attention.self.query.weight", np.nan if s < 4 else 3.0)]
    path = tmp_path / "t.parquet"
    pd.DataFrame(rows, columns=["step", "group", "ratio"]).to_parquet(path)
    corr = distill(path, window=4, schedule=True)
    assert corr.schedule["encoder.layer.1.attention.self.query.weight"] == [[0, 50.0], [4, 3.0]]
    assert corr.source["flagged"] == {"encoder.layer.1.attention.self.query.weight": "no finite ratio"}
    static = distill(path, window=4, schedule=False)
    assert static.multipliers["encoder.layer.1.attention.self.query.weight"] == 50.0
