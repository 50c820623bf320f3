"""The bad-input matrix: every command, every kind of mistake -> one ``error:`` line, exit 2, nothing changed.

Each case runs the real command line (``graftlab.cli.app.run``, what ``graftlab`` calls) in a fresh
copy of a sandbox holding traces (good and nonsensical), corrections files, config files, a plain
file, a checkpoint folder, ... The case passes when the exit code is 2, stderr is exactly one line
starting with ``error:`` (holding the words the case expects, if any, and never ``None`` or a
``--flag`` where a config file's key is meant), stdout is empty, and no file or folder in the
sandbox was created, removed or changed. The count of cases is what the README's reliability table reports
(``pytest tests/cli/test_bad_inputs.py -q`` prints it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graftlab import trace
from graftlab.trace.lock import TraceLock
from tests import results
from tests.cli import error_line

ROOT = Path(__file__).resolve().parents[2]

# A small BERT-like layer-wise partition (name, kind, ffn, block) and the ratio each group records.
GROUPS = [
    ("embeddings.word.weight", "embedding", None, None, 0.1),
    ("blocks.0.attn.query.weight", "Q", None, 0, 8.0),
    ("blocks.0.attn.key.weight", "K", None, 0, 7.0),
    ("blocks.0.attn.value.weight", "V", None, 0, 0.8),
    ("blocks.0.ffn.fc1.weight", "ffn", "fc1", 0, 0.7),
    ("blocks.1.attn.query.weight", "Q", None, 1, 9.0),
    ("blocks.1.ffn.fc2.weight", "ffn", "fc2", 1, 0.6),
    ("head.bias", "output", None, None, 0.02),
]
STEPS = 40


def _meta(groups, granularity="layer"):
    return {
        "format": trace.FORMAT, "granularity": granularity,
        "groups": [{"name": n, "kind": k, "ffn": f, "block": b, "shape": [4], "numel": 4, "members": [n]}
                   for n, k, f, b, _ in groups],
        "magnitude": {"class": "Adam", "hyperparameters": {"lr": 1e-3}},
        "direction": {"class": "SGD", "hyperparameters": {"lr": 0.1}},
        "task": "bert", "batch_size": 8, "seed": 0, "device": "cpu", "every": 1, "flush_every": 20,
        "start_step": 0, "versions": {"graftlab": "0.1.0", "torch": "x"}, "config": None,
    }


def make_trace(path: Path, ratios=None, groups=GROUPS, granularity="layer", steps=STEPS) -> Path:
    """A trace written through graftlab.trace itself (the contract's own writer)."""
    meta = _meta(groups, granularity)
    g = len(groups)
    if ratios is None:
        rng = np.random.default_rng(0)
        base = np.array([r for *_, r in groups])
        ratios = base[None, :] * rng.uniform(0.8, 1.2, size=(steps, g))
    ratios = np.broadcast_to(np.asarray(ratios, dtype=np.float32), (steps, g))
    path.mkdir()
    trace.write_sidecar(path, meta)
    for lo in range(0, steps, 20):
        s = np.arange(lo, min(lo + 20, steps))
        stats = np.stack([ratios[s], np.ones_like(ratios[s]), ratios[s]], axis=1)
        trace.write_part(path, trace.build_table(s, [n for n, *_ in groups], stats, {"lr": np.full(len(s), 0.1)},
                                                 meta))
    return path


def corrections(**fields) -> str:
    return json.dumps({"format": "graftlab.corrections/1", **fields})


def build_sandbox(root: Path) -> None:
    make_trace(root / "T")
    make_trace(root / "G", groups=[("global", "other", None, None, 0.05)], granularity="global")
    make_trace(root / "NAN", ratios=np.nan)
    make_trace(root / "INF", ratios=np.inf)
    make_trace(root / "ZERO", ratios=0.0)
    make_trace(root / "NEG", ratios=-2.0)
    make_trace(root / "MIXED", ratios=np.where(np.arange(len(GROUPS)) % 2, np.nan, -1.0))
    # a single-file trace: a part with the run metadata in its footer (a bare /2 part copied out of
    # its directory has only the marker, and is read as a table without metadata)
    single = pq.read_table(root / "T" / "part-000000000000.parquet")
    full = trace.metadata_bytes(trace.read_metadata(root / "T"))
    pq.write_table(single.replace_schema_metadata({trace.METADATA_KEY: full}), root / "TF.parquet")
    (root / "EMPTY").mkdir()
    (root / "MINE").mkdir()
    (root / "MINE" / "notes.txt").write_text("keep me")
    (root / "ONLYSIDE").mkdir()
    trace.write_sidecar(root / "ONLYSIDE", _meta(GROUPS))
    (root / "notes.txt").write_text("a user's file")
    (root / "garbage.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    pq.write_table(pa.table({"x": [1, 2]}), root / "plain.parquet")
    # tables from other tools: a (step, group) pair twice, a negative step
    (root / "dup.csv").write_text("step,group,ratio\n0,a.weight,1\n0,b.bias,2\n1,a.weight,1\n1,b.bias,2\n"
                                  "1,a.weight,3\n2,a.weight,1\n2,b.bias,2\n3,a.weight,1\n3,b.bias,2\n")
    (root / "plain.csv").write_text("step,group,ratio\n" + "".join(f"{s},{g},{r}\n" for s in range(40)
                                                                 for g, r in (("a.weight", 1.5), ("b.bias", 0.2))))
    pq.write_table(pa.table({"step": [0, 0, 1, 1, -4, -4, 2, 2], "group": ["a", "b"] * 4,
                             "ratio": [1.0] * 8}), root / "negstep.parquet")
    (root / "CK").mkdir()  # a checkpoint folder with no checkpoint in it
    (root / "LOCKED").mkdir()
    make_trace(root / "LOCKED" / "t")
    c = root / "corr"
    c.mkdir()
    (c / "good.json").write_text(corrections(multipliers={n: 1.0 for n, *_ in GROUPS}))
    (c / "start_inf.json").write_text(corrections(schedule={"global": [[0, 1.0], ["x", 2.0]]}).replace('"x"', "Infinity"))
    (c / "start_1e400.json").write_text(corrections(schedule={"global": [[0, 1.0], ["x", 2.0]]}).replace('"x"', "1e400"))
    (c / "start_nan.json").write_text(corrections(schedule={"global": [[0, 1.0], ["x", 2.0]]}).replace('"x"', "NaN"))
    (c / "start_neg.json").write_text(corrections(schedule={"global": [[0, 1.0], [-5, 2.0]]}))
    (c / "start_frac.json").write_text(corrections(schedule={"global": [[0, 1.0], [2.5, 2.0]]}))
    (c / "start_late.json").write_text(corrections(schedule={"global": [[3, 1.0]]}))
    (c / "start_down.json").write_text(corrections(schedule={"global": [[0, 1.0], [10, 2.0], [5, 1.0]]}))
    (c / "piece3.json").write_text(corrections(schedule={"global": [[0, 1.0, 3]]}))
    (c / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (c / "nested_obj.json").write_text('{"format": "graftlab.corrections/1", "multipliers": ' + "[" * 100_000)
    (c / "mult_1e308.json").write_text(corrections(multipliers={"global": 1e308}))
    (c / "mult_inf.json").write_text(corrections(multipliers={"global": "x"}).replace('"x"', "Infinity"))
    (c / "mult_nan.json").write_text(corrections(multipliers={"global": "x"}).replace('"x"', "NaN"))
    (c / "mult_zero.json").write_text(corrections(multipliers={"global": 0}))
    (c / "mult_neg.json").write_text(corrections(multipliers={"global": -1}))
    (c / "mult_str.json").write_text(corrections(multipliers={"global": "2"}))
    (c / "mult_bool.json").write_text(corrections(multipliers={"global": True}))
    (c / "mult_list.json").write_text(corrections(multipliers=[1, 2]))
    (c / "sched_empty.json").write_text(corrections(schedule={"global": []}))
    (c / "nothing.json").write_text(corrections())
    (c / "format.json").write_text(json.dumps({"format": "graftlab.corrections/9", "multipliers": {"a": 1}}))
    (c / "noformat.json").write_text(json.dumps({"multipliers": {"a": 1}}))
    (c / "array.json").write_text("[1, 2, 3]")
    (c / "text.json").write_text("not json at all")
    (c / "empty.json").write_text("")
    (c / "latin1.json").write_bytes(b'{"format": "graftlab.corrections/1", "multipliers": {"\xe9": 1}}')
    (c / "export.csv").write_text("group,kind,factor\na,other,1.0\n")
    (c / "source_bad.json").write_text(corrections(multipliers={"a": 1}, source={"groups": {"a": {"n_finite": -3}}}))
    (c / "source_list.json").write_text(corrections(multipliers={"a": 1}, source={"groups": [1]}))
    (c / "for_adam.json").write_text(corrections(multipliers={"global": 1.0},
                                                   source={"metadata": {"direction": {"class": "Adam"}}}))
    (c / "unknown_groups.json").write_text(corrections(multipliers={"no.such.layer": 2.0}))
    y = root / "cfg"
    y.mkdir()
    (y / "latin1.yaml").write_bytes(b"steps: 3\n# caf\xe9\n")
    (y / "binary.yaml").write_bytes(b"\x00\x01\x02\xff\xfe")
    (y / "list.yaml").write_text("- steps\n- 3\n")
    (y / "scalar.yaml").write_text("3\n")
    (y / "syntax.yaml").write_text("steps: [3\n")
    (y / "unknown.yaml").write_text("stepz: 3\n")
    (y / "steps_str.yaml").write_text("steps: abc\n")
    (y / "steps_frac.yaml").write_text("steps: 2.5\n")
    (y / "steps_null.yaml").write_text("steps:\nbatch_size:\n")
    (y / "lr_nan.yaml").write_text("lr: .nan\n")
    (y / "lr_inf.yaml").write_text("lr: .inf\n")
    (y / "betas1.yaml").write_text("hparams: {betas: [0.9]}\n")
    (y / "betas_str.yaml").write_text("hparams: {betas: fast}\n")
    (y / "m_betas1.yaml").write_text("m_hparams: {betas: [0.9]}\n")
    (y / "d_momentum_neg.yaml").write_text("d_hparams: {momentum: -1}\n")
    (y / "hparams_list.yaml").write_text("hparams: [momentum]\n")
    (y / "milestones.yaml").write_text("milestones: [a, b]\n")
    (y / "resume_maybe.yaml").write_text("resume: maybe\n")
    (y / "seed_str.yaml").write_text("seed: abc\n")
    (y / "deep.yaml").write_text("steps: " + "[" * 10_000 + "]" * 10_000 + "\n")
    (y / "huge_int.yaml").write_text("steps: " + "9" * 5000 + "\n")
    (y / "bad.toml").write_text("steps = [\n")
    (y / "run.txt").write_text("steps: 3\n")
    (y / "ok.yaml").write_text("steps: 3\nbatch_size: 2\n")
    (y / "stpes.yaml").write_text("stpes: 4\n")
    (y / "m_lr_str.toml").write_text('magnitude_lr = "fast"\n')
    (y / "warmup50.toml").write_text("warmup = 50\n")
    (y / "m_lr_neg.yaml").write_text("magnitude_lr: -1\n")
    (y / "steps_true.yaml").write_text("steps: true\n")
    (y / "m_lr_true.yaml").write_text("magnitude_lr: true\n")
    (y / "out_list.yaml").write_text("out: [a, b]\n")
    (y / "steps_1e23.yaml").write_text("steps: 1.0e+23\n")
    # file contents that are not what they claim (sidecars, columns, arrays, corrections, checkpoints)
    for name, edit in (("EVERY0", lambda m: m.update(every=0)),
                       ("DUPGROUP", lambda m: m["groups"].append(dict(m["groups"][0]))),
                       ("EMPTYNAME", lambda m: m["groups"][0].update(name=""))):
        make_trace(root / name)
        meta = json.loads((root / name / trace.SIDECAR).read_text())
        edit(meta)
        (root / name / trace.SIDECAR).write_text(json.dumps(meta))
    pq.write_table(pa.table({"step": pa.array([0, 0, 2**64 - 1, 2**64 - 1], pa.uint64()), "group": ["a", "b"] * 2,
                             "ratio": [1.0] * 4}), root / "u64.parquet")
    pq.write_table(pa.table({"step": [0, 0, 1, 1], "group": ["", "b"] * 2, "ratio": [1.0] * 4}), root / "noname.parquet")
    np.savez(root / "obj.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.array([1, 2], dtype=object))
    (c / "meta_str.json").write_text(corrections(multipliers={"global": 1.0}, source={"metadata": "a string"}))
    (c / "subnormal.json").write_text(corrections(multipliers={"global": 1e-320}))
    (c / "subnormal_sched.json").write_text(corrections(schedule={"global": [[0, 1.0], [5, 1e-320]]}))
    (c / "empty_group.json").write_text(corrections(multipliers={"": 1.0}))
    for name, extra in (("CKNOSHARDS", {"step": 2, "run": "abc"}), ("CKRUNID", {"step": 2, "run": "/../../X"})):
        (root / name / "step-00000002").mkdir(parents=True)
        (root / name / "step-00000002" / "graftlab.json").write_text(json.dumps(
            {"format": "graftlab.checkpoint/1", "world_size": 1, "graft": None,
             "parts": ["model", "magnitude", "direction"], "extra": extra}))
    (y / "nul_out.yaml").write_text('out: "t\\0x"\n')
    (y / "nul_metrics.yaml").write_text('metrics: "m\\0.parquet"\n')
    (y / "nul_data.yaml").write_text('data: "d\\0.txt"\n')
    (root / "RO").mkdir()  # made immutable (chattr +i) in each sandbox: a read-only folder even for root
    make_trace(root / "D")  # a trace whose default corrections file exists
    (root / "D.corrections.json").write_text(corrections(multipliers={n: 1.0 for n, *_ in GROUPS}))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sandbox")
    build_sandbox(root)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: path -> content hash ('dir' for folders)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                out[os.path.relpath(p, root)] = "link:" + os.readlink(p)
            elif stat.S_ISREG(mode):
                out[os.path.relpath(p, root)] = hashlib.sha1(Path(p).read_bytes()).hexdigest()
            else:  # a FIFO: opening it would wait for a writer
                out[os.path.relpath(p, root)] = f"special:{mode:o}"
    return out


# --------------------------------------------------------------------------------------------------
# The cases. Placeholders: every sandbox name above is a path relative to the sandbox (the current
# directory of the command); NEW is a path that does not exist yet.

# record/train runs that would be valid are made tiny, so a case that wrongly succeeds fails fast.
RUN_DEFAULTS = {"--steps": "3", "--batch-size": "2", "--device": "cpu", "--eval-every": "0", "--quiet": None}


def _run(cmd: str, args: str, defaults: bool = True) -> str:
    given = shlex.split(args)
    extra = []
    if defaults:
        for flag, value in RUN_DEFAULTS.items():
            if flag not in given and not (flag == "--steps" and "--epochs" in given):
                extra += [flag] + ([value] if value is not None else [])
    if cmd == "record" and not any(a in ("-o", "--out") for a in given):
        extra += ["-o", "NEW/t"]
    return " ".join([cmd, *map(shlex.quote, given), *extra])


def record(args: str = "", defaults: bool = True) -> str:
    return _run("record", args, defaults)


def train(args: str = "", defaults: bool = True) -> str:
    return _run("train", args, defaults)


# mistakes in the options record and train share: (args, why)
SHARED = [
    ("--steps 0", "zero steps"), ("--steps -5", "negative steps"), ("--steps abc", "steps not a number"),
    ("--steps 1.5", "fractional steps"), ("--epochs 0", "zero epochs"), ("--epochs -1", "negative epochs"),
    ("--epochs nan", "nan epochs"), ("--epochs inf", "infinite epochs"), ("--steps 5 --epochs 1", "steps and epochs"),
    ("--batch-size 0", "zero batch"), ("--batch-size -2", "negative batch"), ("--batch-size x", "batch not a number"),
    ("--schedule nope", "unknown schedule"), ("--schedule ''", "empty schedule"), ("--warmup -1", "negative warmup"),
    ("--warmup nan", "nan warmup"), ("--warmup inf", "infinite warmup"), ("--warmup 10", "warmup longer than the run"),
    ("--power nan", "nan power"), ("--power -1", "negative power"), ("--power inf", "infinite power"),
    ("--schedule step --milestones abc", "milestones not numbers"),
    ("--schedule step --milestones 0.5,x", "a milestone not a number"),
    ("--schedule step --milestones 1.5", "milestone past the end"), ("--schedule step --milestones -0.5", "negative milestone"),
    ("--schedule step --milestones nan", "nan milestone"), ("--schedule step --gamma nan", "nan gamma"),
    ("--schedule step --gamma -1", "negative gamma"), ("--schedule step --gamma inf", "infinite gamma"),
    ("--device tpu", "unknown device"), ("--device ''", "empty device"), ("--threads 0", "zero threads"),
    ("--threads -1", "negative threads"), ("--seed -1", "negative seed"), ("--seed 99999999999999999999999", "huge seed"),
    ("--eval-every -1", "negative eval interval"), ("--task nope", "unknown task"), ("--size huge", "unknown size"),
    ("--data NEW/nothing.txt", "missing data"), ("--data EMPTY", "empty data folder"),
    ("--metrics EMPTY", "metrics a folder"), ("--metrics notes.txt/m.parquet", "metrics under a file"),
    ("--metrics notes.txt", "metrics exists"), ("--metrics T/m.parquet", "metrics inside a trace"),
    ("--metrics TF.parquet --overwrite", "metrics over a trace file"),
    ("--metrics cfg/ok.yaml --config cfg/ok.yaml --overwrite", "metrics over the config file"),
    ("--checkpoint-dir notes.txt", "checkpoint dir a file"), ("--checkpoint-dir notes.txt/ck", "checkpoint dir under a file"),
    ("--checkpoint-dir T", "checkpoint dir a trace"), ("--checkpoint-dir T/ck", "checkpoint dir inside a trace"),
    ("--checkpoint-every 5", "checkpoint interval without a dir"), ("--checkpoint-dir CK --checkpoint-every -1", "negative checkpoint interval"),
    ("--resume", "resume without a checkpoint dir"),
    ("--config NEW/none.yaml", "missing config"), ("--config cfg/latin1.yaml", "non-UTF-8 YAML"),
    ("--config cfg/binary.yaml", "binary YAML"), ("--config cfg/list.yaml", "YAML list"),
    ("--config cfg/scalar.yaml", "YAML scalar"), ("--config cfg/syntax.yaml", "YAML syntax"),
    ("--config cfg/unknown.yaml", "unknown key"), ("--config cfg/steps_str.yaml", "steps: abc"),
    ("--config cfg/steps_frac.yaml", "steps: 2.5"), ("--config cfg/steps_null.yaml", "empty keys"),
    ("--config cfg/milestones.yaml", "milestones: [a, b]"), ("--config cfg/resume_maybe.yaml", "resume: maybe"),
    ("--config cfg/seed_str.yaml", "seed: abc"), ("--config cfg/deep.yaml", "deeply nested YAML"),
    ("--config cfg/huge_int.yaml", "a 5000-digit int"), ("--config cfg/bad.toml", "TOML syntax"),
    ("--config cfg/run.txt", "config suffix"), ("--config EMPTY", "config a folder"),
    ("--nope", "unknown option"), ("--steps", "option without its value"), ("extra", "stray argument"),
]

CASES: list[tuple[str, str, tuple[str, ...]]] = []


def case(cid: str, argv: str, *says: str) -> None:
    """A case; ``says``: words its error line must hold ("!words": must not hold)."""
    CASES.append((cid, argv, says))


# what the error line says, by case id: flags for the options the library names as parameters,
# keys for a config file's keys
SAYS: dict[str, tuple[str, ...]] = {
    "steps and epochs": ("give either --steps or --epochs, not both",),
    "unknown key": ("unknown config key(s) stepz", "valid keys are task, size, data, steps, epochs, batch_size", "!--"),
    "steps: abc": ("config key 'steps' must be a whole number, got 'abc'", "!--"),
    "out is a file": ("--out 'notes.txt' is a file, not a folder",),
    "out a folder of other files": ("--out 'MINE' is a folder that does not hold a graftlab trace: choose another path",
                                    "!already exists"),
    "out a folder of other files, --overwrite": ("--out 'MINE' is a folder that does not hold a graftlab trace",),
    "resume from an empty checkpoint folder": ("recorded without --checkpoint-dir", "!None"),
    "every 0": ("--every must be >= 1, got 0",),
    "M lr nan": ("--magnitude-lr must be a finite number, got nan", "!config key"),
    "lr nan": ("--lr must be a finite number, got nan", "!config key"),
    "lr: .nan in YAML": ("config key 'lr' must be a finite number, got nan",),
    "window 0": ("--window must be a positive number of steps",),
    "start negative": ("--start must be a step number >= 0",),
    "start past the end": ("--start 40 is past the trace's end", "--start + --window <= 40"),
    "unknown --by": ("--by must be 'group' or 'kind', not 'nope'",),
    "a foreign table with a (step, group) pair twice": ("dup.csv: step 1 of group 'a.weight' appears in more than one row",),
    "a foreign table with a negative step": ("negstep.parquet: step -4 is negative",),
    "unknown rounding": ("--round 'nope' is not a rounding", "!bad rounding"),
    "Dabc": ("--round 'Dabc': D<beta> needs a positive finite beta, e.g. D500", "!DA"),
    "even filter": ("--filter must be an odd median-filter width (0 or 1 turns it off)", "got 4"),
    "output folder missing": ("--out 'NEW/dir/c.json'", "'NEW/dir' does not exist"),
    "unknown option": ("No such option: --nope", "!Possible options"),
    "unknown option, close to one": ("No such option: --steps (did you mean --start?)",),
    "a corrections file": ("corr/good.json: a graftlab corrections file, not a trace", "graftlab show",
                           "graftlab train --corrections", "!magic"),
}


for args, why in SHARED:
    case(f"record: {why}", record(args), *SAYS.get(why, ()))
    case(f"train: {why}", train(args), *SAYS.get(why, ()))
case("record: step milestones decreasing", record("--schedule step --milestones 0.9,0.5"),
     "--milestones must be increasing", "!step milestones")
case("record: step gamma above 1", record("--schedule step --gamma 2"), "--gamma must be <= 1, got 2")
case("train: corrections for another optimizer", train("--corrections corr/for_adam.json --optimizer sgd"),
     "not --optimizer sgd", "leave --optimizer unset to train adam", "pass --allow-other-optimizer")
case("record: no out", "record --steps 3 --batch-size 2 --device cpu --quiet", "--out is required")
case("record: stpes in YAML", record("--config cfg/stpes.yaml"), "stpes (did you mean steps?)",
     "valid keys are task, size, data, steps, epochs, batch_size", "checkpoint_dir", "!--")
case("record: magnitude_lr a string in TOML", record("--config cfg/m_lr_str.toml"),
     "config file 'cfg/m_lr_str.toml': config key 'magnitude_lr' must be a finite number, got 'fast'", "!--")
# a value the config file set is named as its key there, one given on the command line as its flag
case("record: warmup from TOML longer than training", record("--config cfg/warmup50.toml --steps 10"),
     "config key 'warmup' (cfg/warmup50.toml) (50 steps) must be shorter than training (10 steps)", "!--warmup")
case("record: --warmup over the TOML's, longer than training", record("--config cfg/warmup50.toml --warmup 60 --steps 10"),
     "--warmup (60 steps) must be shorter than training", "!config key")
case("record: magnitude_lr negative in YAML", record("--config cfg/m_lr_neg.yaml"),
     "config file 'cfg/m_lr_neg.yaml': config key 'magnitude_lr' must be > 0, got -1", "!--magnitude-lr")
case("record: --magnitude-lr over the YAML's, negative", record("--config cfg/m_lr_neg.yaml --magnitude-lr -2"),
     "--magnitude-lr must be > 0, got -2", "!config key")
# values checked against their field's schema (strict types, bounds), one line each
case("record: steps: true in YAML", record("--config cfg/steps_true.yaml", defaults=False) + " -o NEW/t --quiet",
     "config key 'steps' must be a whole number, got True")
case("record: magnitude_lr: true in YAML", record("--config cfg/m_lr_true.yaml"),
     "config key 'magnitude_lr' must be a finite number, got True")
case("record: out: [a, b] in YAML", "record --config cfg/out_list.yaml --steps 3 --quiet",
     "config key 'out' must be a path (text), got ['a', 'b']")
case("record: steps: 1e23 in YAML", record("--config cfg/steps_1e23.yaml", defaults=False) + " --quiet",
     "config key 'steps' must be a whole number")
case("record: steps beyond the bound", record("--steps 10000000000"), "--steps must be <= 1000000000")
case("record: milestones repeated", record("--schedule step --milestones 0.5,0.5"),
     "--milestones must be increasing fractions in (0, 1), got [0.5, 0.5]")
case("record: a boolean hyperparameter given 2", record("-d adam --d-hparam amsgrad=2"),
     "--d-hparam: adam hyperparameter amsgrad must be true or false, got 2")

for args, why in [
    ("-o notes.txt", "out is a file"), ("-o notes.txt --overwrite", "out is a file, --overwrite"),
    ("-o notes.txt/t", "out under a file"), ("-o MINE", "out a folder of other files"),
    ("-o MINE --overwrite", "out a folder of other files, --overwrite"), ("-o T", "out an existing trace"),
    ("-o T/sub", "out inside a trace"), ("-o EMPTY/../T", "out an existing trace, dotted"),
    ("-o T --resume --checkpoint-dir CK", "resume from an empty checkpoint folder"),
    ("-o T --resume --checkpoint-dir NEW/ck", "resume from a missing checkpoint folder"),
    ("-o T --overwrite --threads 0", "overwrite with bad threads"), ("-o T --overwrite --schedule nope", "overwrite with bad schedule"),
    ("-o T --overwrite --checkpoint-every 5", "overwrite with checkpoint interval but no dir"),
    ("-o T --overwrite --metrics notes.txt/m.parquet", "overwrite with metrics under a file"),
    ("-o NEW/t --metrics NEW/t/m.parquet", "metrics inside the new trace"),
    ("-o NEW/t --checkpoint-dir NEW/t", "checkpoints into the new trace"),
    ("-o NEW/t --checkpoint-dir NEW/t/ck", "checkpoints inside the new trace"),
    ("-o cfg/ok.yaml --config cfg/ok.yaml --overwrite", "out over the config file"),
    ("-o LOCKED/t --overwrite", "out being written by another process"),
    ("-o LOCKED/t --resume --checkpoint-dir CK", "resume into a trace another process writes"),
    ("--magnitude nope", "unknown M"), ("--direction nope", "unknown D"), ("--granularity rows", "unknown granularity"),
    ("--every 0", "every 0"), ("--every -1", "every negative"), ("--flush-every 0", "flush every 0"),
    ("--flush-every -3", "flush every negative"), ("--magnitude-lr nan", "M lr nan"), ("--magnitude-lr -1", "M lr negative"),
    ("--direction-lr inf", "D lr infinite"), ("--m-hparam betas=0.9", "betas one number"),
    ("--magnitude-lr nan --direction-lr 0.1", "M lr nan, D lr given"),
    ("--m-hparam betas=0.9,0.98,0.5", "betas three numbers"), ("--m-hparam betas=2,0.9", "betas out of range"),
    ("--m-hparam momentum=0.9", "hyperparameter M lacks"), ("--d-hparam momentum", "hyperparameter without a value"),
    ("--d-hparam momentum=abc", "hyperparameter not a number"), ("--d-hparam momentum=-1", "negative momentum"),
    ("--d-hparam =1", "hyperparameter without a name"), ("--config cfg/m_betas1.yaml", "betas: [0.9] in YAML"),
    ("--config cfg/d_momentum_neg.yaml", "momentum: -1 in YAML"),
]:
    case(f"record: {why}", record(args), *SAYS.get(why, ()))

for args, why in [
    ("--optimizer nope", "unknown optimizer"), ("--lr nan", "lr nan"), ("--lr -1", "lr negative"), ("--lr inf", "lr infinite"),
    ("--lr abc", "lr not a number"), ("--hparam betas=0.9", "betas one number"), ("--hparam betas=0.9,x", "betas not numbers"),
    ("--hparam eps=-1", "negative eps"), ("--hparam momentum=0.9", "hyperparameter Adam lacks"),
    ("--hparam nope=1", "unknown hyperparameter"), ("--hparam momentum", "hyperparameter without a value"),
    ("--optimizer sgd --hparam momentum=abc", "hyperparameter not a number"),
    ("--optimizer sgd --hparam nesterov=maybe", "boolean not a boolean"),
    ("--config cfg/betas1.yaml", "betas: [0.9] in YAML"), ("--config cfg/betas_str.yaml", "betas: fast in YAML"),
    ("--config cfg/hparams_list.yaml", "hparams list without a value"), ("--config cfg/lr_nan.yaml", "lr: .nan in YAML"),
    ("--config cfg/lr_inf.yaml", "lr: .inf in YAML"),
    ("--corrections NEW/none.json", "missing corrections"), ("--corrections EMPTY", "corrections a folder"),
    ("--metrics corr/good.json --corrections corr/good.json --overwrite", "metrics over the corrections file"),
    ("--metrics T --overwrite", "metrics over a trace folder"),
] + [(f"--corrections corr/{name}", f"corrections {name}") for name in (
    "start_inf.json", "start_1e400.json", "start_nan.json", "start_neg.json", "start_frac.json", "start_late.json",
    "start_down.json", "piece3.json", "nested.json", "nested_obj.json", "mult_1e308.json",
    "mult_inf.json", "mult_nan.json", "mult_zero.json", "mult_neg.json", "mult_str.json", "mult_bool.json",
    "mult_list.json", "sched_empty.json", "nothing.json", "format.json", "noformat.json", "array.json", "text.json",
    "empty.json", "latin1.json", "export.csv", "source_bad.json", "source_list.json", "unknown_groups.json",
)] + [("--corrections corr/mult_1e308.json --lr 10 --optimizer sgd", "corrections 1e308 x lr 10")]:
    case(f"train: {why}", train(args), *SAYS.get(why, ()))

for args, why in [
    ("", "no trace"), (".", "the current folder"), ("EMPTY", "an empty folder"), ("MINE", "a folder of other files"),
    ("ONLYSIDE", "a trace that never flushed"), ("notes.txt", "a text file"), ("garbage.parquet", "not Parquet"),
    ("plain.parquet", "Parquet without graftlab metadata"), ("NEW/none", "a missing path"), ("corr", "a folder of JSON"),
    ("NAN", "all ratios NaN"), ("INF", "all ratios infinite"), ("ZERO", "all ratios zero"), ("NEG", "all ratios negative"),
    ("MIXED", "ratios NaN or negative"),
    ("T --window 0", "window 0"), ("T --window -5", "window negative"), ("T --window 41", "window longer than the trace"),
    ("T --window abc", "window not a number"), ("T --start -1", "start negative"), ("T --start 40 --window 1", "start past the end"),
    ("T --round nope", "unknown rounding"), ("T --round D0", "D0"), ("T --round Dabc", "Dabc"), ("T --round D-5", "D negative"),
    ("T --round Dnan", "Dnan"), ("T --round Dinf", "Dinf"), ("T --filter 4 --window 10", "even filter"),
    ("T --filter -3 --window 10", "negative filter"), ("T --tie '(' --window 10 --round D5", "bad tie regex"),
    ("T --outlier -1 --window 10", "negative outlier"), ("T --outlier nan --window 10", "nan outlier"),
    ("T --outlier inf --window 10", "infinite outlier"), ("T --format xml --window 10", "unknown format"),
    ("T --window 10 -o notes.txt", "output exists"), ("T --window 10 -o EMPTY", "output a folder"),
    ("T --window 10 -o notes.txt/c.json", "output under a file"), ("T --window 10 -o NEW/dir/c.json", "output folder missing"),
    ("T --window 10 -o T/c.json", "output inside the trace"), ("T --window 10 -o T/c.json --overwrite", "output inside the trace, --overwrite"),
    ("T --window 10 -o T/part-000000000030.parquet", "output a new part of the trace"),
    ("T --window 10 -o T/part-000000000020.parquet --overwrite", "output over a part of the trace"),
    ("TF.parquet --window 10 -o TF.parquet --overwrite", "output over the trace file"),
    ("T --window 10 -o T/_graftlab.json --overwrite", "output over the sidecar"),
    ("T --window 10 -o G/c.json", "output inside another trace"),
    ("T --window 10 --nope", "unknown option"), ("T --steps 5", "unknown option, close to one"),
    ("dup.csv --window 2", "a foreign table with a (step, group) pair twice"),
    ("negstep.parquet --window 2", "a foreign table with a negative step"),
    ("corr/good.json", "a corrections file"),
]:
    case(f"distill: {why}", f"distill {args}", *SAYS.get(why, ()))
# the start is as much the problem as the window
case("distill: window from start past the end", "distill T --start 39 --window 10",
     "--window 10 from --start 39 runs past the end", "--start + --window <= 40")
# every option is checked before the (default) output's existence
case("distill: default output exists", "distill D --window 10", "'D.corrections.json' already exists; pass --overwrite")
case("distill: bad tie, default output exists", "distill D --tie '(' --window 10 --round D5",
     "--tie '(' is not a valid regex", "!already exists")
case("distill: start past the end, default output exists", "distill D --start 1000",
     "--start 1000 is past the trace's end", "!already exists")
case("distill: even filter, default output exists", "distill D --filter 4 --window 10", "!already exists")
case("distill: --out exists", "distill T --window 10 --out notes.txt", "'notes.txt' already exists")
case("distill: filter beyond memory", "distill T --filter 1000000001 --window 10", "--filter must be at most 100001")
case("distill: tie regex repeating 10**11 times", "distill T --tie 'a{99999999999}' --round D5 --window 10",
     "--tie 'a{99999999999}' repeats more than 1000 times")

for args, why in [
    ("", "no trace"), (".", "the current folder"), ("EMPTY", "an empty folder"), ("MINE", "a folder of other files"),
    ("ONLYSIDE", "a trace that never flushed"), ("notes.txt", "a text file"), ("garbage.parquet", "not Parquet"),
    ("plain.parquet", "Parquet without graftlab metadata"), ("NEW/none", "a missing path"),
    ("T --groups maybe", "bad flag value"), ("negstep.parquet", "a foreign table with a negative step"),
    ("corr/good.json", "a corrections file"),
]:
    case(f"info: {why}", f"info {args}", *SAYS.get(why, ()))

for args, why in [
    ("T", "no output"), ("NAN -f 5 -o NEW/f.png", "all-NaN trace"), ("INF -f 5 -o NEW/f.png", "all-inf trace"),
    ("NAN -o NEW/figs", "all-NaN trace, all figures"), ("ZERO -f corrections -o NEW/f.png", "all-zero trace, corrections chart"),
    ("NEG -f 5 -o NEW/f.png", "negative ratios"),
    ("T -f 5 -o NEW/f.xyz", "unknown image format"), ("T -f 5 -o NEW/f", "no suffix"), ("T -f 5 -o EMPTY", "one figure into a folder"),
    ("T -f 5 -o notes.txt", "output exists"), ("T -f 5 -o notes.txt/f.png", "output under a file"),
    ("T -o notes.txt", "all figures into a file"), ("T -o notes.txt/figs", "all figures under a file"),
    ("T -o T", "all figures into the trace"), ("T -o T --overwrite", "all figures into the trace, --overwrite"),
    ("T -f 5 -o T/f.png", "one figure inside the trace"), ("T -f 5 -o G/f.png", "one figure inside another trace"),
    ("T -f 5 -o TF.parquet --overwrite", "figure over a trace file"), ("TF.parquet -f 5 -o TF.parquet --overwrite", "figure over its input"),
    ("T -f 9 -o NEW/f.png", "unknown figure"), ("T T T -f 6 -o NEW/f.png", "three traces"), ("T G -f 5 -o NEW/f.png", "figure 5 of two traces"),
    ("T G -o NEW/figs", "two granularities"),
    ("T -f 4 -o NEW/f.png", "figure 4 of a layer trace"),
    ("T -f 5 --steps 0 -o NEW/f.png", "zero steps"), ("T -f 5 --steps -3 -o NEW/f.png", "negative steps"),
    ("T -f 5 --steps 10 --steps 20 -o NEW/f.png", "more steps than traces"), ("T -f 5 --width 4 -o NEW/f.png", "even width"),
    ("T -f 5 --width -3 -o NEW/f.png", "negative width"), ("T -f corrections --window 0 -o NEW/f.png", "window 0"),
    ("T -f corrections --round nope -o NEW/f.png", "bad rounding"), ("EMPTY -f 5 -o NEW/f.png", "not a trace"),
    ("NEW/none -f 5 -o NEW/f.png", "missing trace"), ("notes.txt -f 5 -o NEW/f.png", "a text file"),
    # a table without graftlab metadata: its note is not printed when the command is refused
    ("plain.csv -f 5 -o notes.txt", "no metadata, output exists"), ("plain.csv -f 5 -o NEW/f.xyz", "no metadata, bad suffix"),
    ("plain.csv -o notes.txt", "no metadata, all figures into a file"), ("plain.csv -f 4 -o NEW/f.png", "no metadata, figure 4"),
    ("T -f 5 --width 1000000001 -o NEW/f.png", "a filter wider than memory"), ("T -f 5 -o ''", "an empty output"),
    ("T -f 5 -o NEW/f.pgf", "a format that needs LaTeX"), ("T -o ''", "an empty output folder"),
]:
    case(f"plot: {why}", f"plot {args}")

for args, why in [
    ("--window 0", "window 0"), ("--window -1", "window negative"), ("--window 500", "window longer than the run"),
    ("--round Dabc", "round Dabc"), ("--round D0", "round D0"), ("--round nope", "round unknown"),
    ("--steps 2", "too few steps"), ("--steps 0", "zero steps"), ("--batch-size 0", "zero batch"),
    ("--momentum -1", "negative momentum"), ("--momentum nan", "nan momentum"), ("--device tpu", "unknown device"),
    ("--seed -1", "negative seed"), ("--out T", "out a trace"), ("--out notes.txt", "out a file"),
    ("--out notes.txt/demo", "out under a file"), ("--out T/demo", "out inside a trace"), ("--out EMPTY", "out exists"),
    ("--momentum 2", "momentum 2"), ("--momentum 1", "momentum 1"),
]:
    case(f"demo: {why}", f"demo --quick --quiet {args}")

for args, why in [
    ("nope", "unknown experiment"), ("transformer --out notes.txt", "out a file"),
    ("transformer --out notes.txt/e", "out under a file"), ("transformer --out T", "out a trace"),
    ("transformer --out T/e", "out inside a trace"), ("transformer --out DONE", "finished experiment without --overwrite"),
    ("transformer --steps 0", "zero steps"), ("transformer --steps -1", "negative steps"), ("transformer --size huge", "unknown size"),
    ("transformer --batch-size 0", "zero batch"), ("transformer --seeds 0", "zero seeds"), ("transformer --device tpu", "unknown device"),
    ("transformer --eval-size 0", "zero eval size"), ("transformer --threads 0", "zero threads"),
    ("resnet --steps 0", "resnet zero steps"), ("resnet --task gpt", "resnet given a task"),
    ("batch_transfer --preset gpu", "batch_transfer given a preset"), ("batch_transfer --batch-size -1", "batch_transfer negative batch"),
]:
    case(f"experiment: {why}", f"experiment {args} --quick --out NEW/e" if "--out" not in args else f"experiment {args} --quick")

for args, why in [
    ("", "no file"), ("NEW/none.json", "a missing file"), ("EMPTY", "a folder"), ("corr/text.json", "not JSON"),
    ("corr/nested.json", "deeply nested JSON"), ("corr/start_inf.json", "a schedule starting at Infinity"),
    ("corr/mult_nan.json", "a NaN factor"), ("corr/export.csv", "the CSV export"), ("corr/latin1.json", "not UTF-8"),
    ("corr/good.json --by nope", "unknown --by"), ("T", "a trace"),
]:
    case(f"show: {why}", f"show {args}", *SAYS.get(why, ()))

# file contents: each one line, never a traceback
LONG = "x" * 300
for cid, argv, *says in [
    ("info: a sidecar with every 0", "info EVERY0", "'every' must be a whole number >= 1, got 0"),
    ("distill: a sidecar with every 0", "distill EVERY0 --window 10", "'every' must be a whole number >= 1"),
    ("info: a sidecar naming a group twice", "info DUPGROUP", "names the group 'embeddings.word.weight' twice"),
    ("distill: a sidecar naming a group twice", "distill DUPGROUP --window 10", "twice"),
    ("info: a sidecar with an empty group name", "info EMPTYNAME", "a group needs a name"),
    ("plot: a sidecar with an empty group name", "plot EMPTYNAME -f 5 -o NEW/f.png", "a group needs a name"),
    ("info: a uint64 step column past int64", "info u64.parquet", "beyond the largest step number"),
    ("distill: a uint64 step column past int64", "distill u64.parquet --window 1", "beyond the largest step number"),
    ("info: a table with an empty group name", "info noname.parquet", "a group needs a name"),
    ("train: an npz of object arrays", train("--task resnet --data obj.npz"), "Object arrays cannot be loaded"),
    ("train: corrections whose source.metadata is a string", train("--corrections corr/meta_str.json"),
     "'source.metadata' must be an object"),
    ("show: corrections whose source.metadata is a string", "show corr/meta_str.json", "'source.metadata'"),
    ("train: a subnormal factor", train("--corrections corr/subnormal.json"), "not subnormal"),
    ("train: a subnormal factor in a schedule", train("--corrections corr/subnormal_sched.json"), "not subnormal"),
    ("show: a subnormal factor", "show corr/subnormal.json", "not subnormal"),
    ("train: a factor for an empty group name", train("--corrections corr/empty_group.json"), "a group needs a name"),
    ("record: resume from a checkpoint without shards", record("-o NEW/t --resume --checkpoint-dir CKNOSHARDS"),
     "records no digest of its files"),
    ("record: resume from a checkpoint whose run id is a path", record("-o NEW/t --resume --checkpoint-dir CKRUNID"),
     "run id '/../../X' is not one graftlab writes"),
    # the operating system: FIFOs, devices, links, long names, NUL bytes, read-only folders
    ("info: a FIFO named like a part", "info FIFOPART", "is a FIFO, not a regular file"),
    ("distill: a FIFO named like a part", "distill FIFOPART --window 10", "is a FIFO"),
    ("info: a FIFO as the sidecar", "info FIFOSIDE", "is a FIFO"),
    ("distill: a FIFO as the sidecar", "distill FIFOSIDE --window 10", "is a FIFO"),
    ("train: a FIFO as the corrections file", train("--corrections fifo.json"), "is a FIFO"),
    ("record: a FIFO as the config file", record("--config fifo.yaml"), "is a FIFO"),
    ("distill: output a FIFO, --overwrite", "distill T --window 10 -o out.fifo --overwrite", "is a FIFO; not replacing it"),
    ("distill: output /dev/null, --overwrite", "distill T --window 10 -o /dev/null --overwrite", "is a device"),
    ("plot: output /dev/null, --overwrite", "plot T -f 5 -o /dev/null --overwrite"),
    ("record: out /dev/null, --overwrite", record("-o /dev/null --overwrite")),
    ("record: out a FIFO, --overwrite", record("-o out.fifo --overwrite")),
    ("distill: output a dangling link", "distill T --window 10 -o dangling.json", "symbolic link"),
    ("distill: output a dangling link, --overwrite", "distill T --window 10 -o dangling.json --overwrite", "symbolic link"),
    ("distill: output a link loop, --overwrite", "distill T --window 10 -o loop.json --overwrite", "symbolic link"),
    ("distill: output a link to a user's file, --overwrite", "distill T --window 10 -o link.json --overwrite",
     "symbolic link"),
    ("plot: output a dangling link", "plot T -f 5 -o dangling.png", "symbolic link"),
    ("distill: output name too long", f"distill T --window 10 -o {LONG}.json", "file name too long"),
    ("record: out name too long", record(f"-o {LONG}"), "file name too long"),
    ("plot: output name too long", f"plot T -f 5 -o {LONG}.png", "file name too long"),
    ("record: a NUL byte in out from a config file", record("--config cfg/nul_out.yaml", defaults=True).replace(
        " -o NEW/t", ""), "NUL byte"),
    ("train: a NUL byte in metrics from a config file", train("--config cfg/nul_metrics.yaml"), "NUL byte"),
    ("record: a NUL byte in data from a config file", record("--config cfg/nul_data.yaml")),
    ("distill: output into a read-only folder", "distill T --window 10 -o RO/c.json", "Operation not permitted"),
    ("distill: CSV into a read-only folder", "distill T --window 10 --format csv -o RO/c.csv", "not permitted"),
    ("plot: output into a read-only folder", "plot T -f 5 -o RO/f.png", "not permitted"),
    ("plot: all figures into a read-only folder", "plot T -o RO/figs", "not permitted"),
    ("record: out into a read-only folder", record("-o RO/t"), "not permitted"),
    ("train: metrics into a read-only folder", train("--metrics RO/m.parquet"), "not permitted"),
]:
    case(cid, argv, *says)

case("graftlab: unknown command", "nope")
case("graftlab: unknown root option", "--nope")


@pytest.fixture
def sandbox(template, tmp_path, monkeypatch):
    root = tmp_path / "box"
    shutil.copytree(template, root)
    done = root / "DONE"
    (done / "runs").mkdir(parents=True)
    (done / "results.md").write_text("# results of a finished experiment\n")
    (done / "settings.json").write_text("{}\n")
    # things copytree cannot copy (it would open a FIFO and follow a link): made in each sandbox
    shutil.copytree(root / "T", root / "FIFOPART")
    os.mkfifo(root / "FIFOPART" / "part-000000000040.parquet")
    shutil.copytree(root / "T", root / "FIFOSIDE")
    (root / "FIFOSIDE" / trace.SIDECAR).unlink()
    os.mkfifo(root / "FIFOSIDE" / trace.SIDECAR)
    for name in ("fifo.json", "fifo.yaml", "out.fifo"):
        os.mkfifo(root / name)
    (root / "dangling.json").symlink_to(root / "NEW" / "nowhere.json")
    (root / "dangling.png").symlink_to(root / "NEW" / "nowhere.png")
    (root / "loop.json").symlink_to(root / "loop.json")
    (root / "link.json").symlink_to(root / "notes.txt")
    read_only = subprocess.run(["chattr", "+i", str(root / "RO")], capture_output=True).returncode == 0
    monkeypatch.chdir(root)
    monkeypatch.setenv("COLUMNS", "200")
    lock = TraceLock(root / "LOCKED" / "t").acquire()  # another writer holds this trace
    yield root
    lock.release()
    if read_only:
        subprocess.run(["chattr", "-i", str(root / "RO")], check=True)


def _immutable(path: Path) -> bool:
    res = subprocess.run(["lsattr", "-d", str(path)], capture_output=True, text=True)
    return res.returncode == 0 and "i" in res.stdout.split()[0]


PASSED: list[str] = []  # the cases whose every check passed in this run


@pytest.fixture(scope="module", autouse=True)
def _count_cases():
    """After the module: the cases that passed, for the README's reliability table (written when
    ``GRAFTLAB_RESULTS`` is set, tests/results.py)."""
    yield
    if PASSED:
        results.write("bad_inputs", {"cases": len(CASES), "passed": len(PASSED)},
                      "python -m pytest tests/cli/test_bad_inputs.py")


def test_case_count():
    """The matrix is unique and no smaller than it was; the committed count the README quotes
    (bench/results/bad_inputs.json, from a full run) is this matrix's."""
    ids = [cid for cid, *_ in CASES]
    assert len(set(ids)) == len(ids), "case ids must be unique"
    assert len(CASES) > 200
    committed = json.loads((ROOT / "bench" / "results" / "bad_inputs.json").read_text())
    assert committed["cases"] == committed["passed"] == len(CASES), \
        "rerun `GRAFTLAB_RESULTS=bench/results python -m pytest tests/cli/test_bad_inputs.py` and bench/report.py"


@pytest.mark.parametrize("argv,says", [(a, s) for _, a, s in CASES], ids=[c for c, *_ in CASES])
def test_bad_input(argv, says, sandbox, capsys):
    if " RO/" in argv and not (sandbox / "RO").exists() or (" RO/" in argv and not _immutable(sandbox / "RO")):
        pytest.skip("chattr +i is not available here: no read-only folder root cannot write into")
    before = snapshot(sandbox)
    line, out = error_line(capsys, argv)
    for words in says:
        if words.startswith("!"):
            assert words[1:] not in line, line
        else:
            assert words in line, line
    assert "None" not in line or "None" in argv, line  # a default's None is no message
    assert out == "", out
    after = snapshot(sandbox)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"changed: {changed}"
    PASSED.append(argv)


@pytest.mark.slow
@pytest.mark.parametrize("argv", ["distill .", "record -o notes.txt --steps 3 --quiet",
                                  "train --corrections corr/start_inf.json --steps 3"])
def test_real_process_prints_one_line_and_exits_2(argv, sandbox):
    """The installed entry point (a real process) behaves as run() does in-process."""
    res = subprocess.run([sys.executable, "-m", "graftlab", *shlex.split(argv)], capture_output=True, text=True,
                         cwd=sandbox, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr


def test_missing_data_names_the_option(sandbox):
    """The library names the parameter (``data 'x' does not exist``); the command line the flag."""
    res = subprocess.run([sys.executable, "-m", "graftlab", "record", "--data", "nope", "-o", "t", "--steps", "2"],
                         capture_output=True, text=True, cwd=sandbox, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == "error: --data 'nope' does not exist"
    assert not (sandbox / "t").exists()
