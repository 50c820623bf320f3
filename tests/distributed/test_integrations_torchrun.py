"""Two gloo ranks under torchrun (CPU): the unmodified one-process loop of docs/trainers.md, with a
Recorder on every rank, writes the one-process trace from rank 0 and nothing else; the DDP version
of the same loop writes the same trace; the Hugging Face Trainer snippet, unchanged, trains
data-parallel through accelerate and writes its trace from rank 0."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import graftlab
from tests import procs
from tests.integrations.test_integrations_docs import snippet

ROOT = Path(__file__).resolve().parents[2]

# runs each script as `python script.py` would, in its own directory, one after the other: one
# torchrun launch for several scripts (each process can join one process group only)
DRIVER = """
import os, runpy, sys
for script in sys.argv[1:]:
    os.chdir(os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
print("rank", os.environ["RANK"], "done")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("this PyTorch build has no torch.distributed")
    base = tmp_path_factory.mktemp("torchrun")
    scripts = {}
    for name, code in (("one", snippet("Plain loop")), ("plain", snippet("Plain loop")),
                       ("ddp", snippet("Several processes: torchrun, DDP, FSDP2"))):
        (base / name).mkdir()
        scripts[name] = base / name / "train.py"
        scripts[name].write_text(code)
    procs.run([sys.executable, scripts["one"]], seconds=300, cwd=base / "one", env=ENV)
    torchrun(base, scripts["plain"], scripts["ddp"])
    return base


ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
ENV.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def torchrun(base: Path, *scripts: Path) -> None:
    (base / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(base / "driver.py"), *map(str, scripts)]
    proc = procs.run(cmd, seconds=600, cwd=base, env=ENV)
    assert "rank 0 done" in proc.stdout and "rank 1 done" in proc.stdout


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_unmodified_script_on_two_ranks_writes_the_one_process_trace(runs):
    one = graftlab.read_trace(runs / "one" / "runs" / "plain")
    two = graftlab.read_trace(runs / "plain" / "runs" / "plain")
    assert len(one) == 40 * 4
    for col in one.columns:
        np.testing.assert_array_equal(two[col].to_numpy(), one[col].to_numpy(), err_msg=col)
    # rank 1 wrote nothing: the two directories hold the same files
    assert files_under(runs / "plain") == files_under(runs / "one")


@pytest.mark.slow
def test_ddp_loop_on_two_ranks_writes_the_one_process_trace(runs):
    one = graftlab.read_trace(runs / "one" / "runs" / "plain")
    ddp = graftlab.read_trace(runs / "ddp" / "runs" / "ddp")
    assert list(ddp.step) == list(one.step) and list(ddp.group) == list(one.group)
    # half batches, gradients averaged by DDP: the global batch's step, up to float32 rounding (the
    # gradient is summed in another order; relative differences reach 4e-4 on groups with tiny steps)
    for col in ("norm_m", "norm_d", "ratio", "lr", "loss"):
        np.testing.assert_allclose(ddp[col].to_numpy(), one[col].to_numpy(), rtol=2e-3, err_msg=col)
    # rank 0 alone writes: one part, the sidecar and the writer's hidden lock file
    assert files_under(runs / "ddp") == ["runs/ddp/.graftlab.lock", "runs/ddp/_graftlab.json",
                                         "runs/ddp/part-000000000000.parquet", "train.py"]


@pytest.mark.slow
def test_hf_trainer_snippet_on_two_ranks_writes_one_trace_from_rank_0(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    (tmp_path / "hf").mkdir()
    script = tmp_path / "hf" / "train.py"
    script.write_text(snippet("Hugging Face Trainer"))
    torchrun(tmp_path, script)
    df = graftlab.read_trace(tmp_path / "hf" / "runs" / "hf-trace")
    meta = df.attrs["graftlab"]
    assert meta["config"]["trainer"]["world_size"] == 2 and meta["batch_size"] == 16
    assert list(df.step.unique()) == list(range(16))
    lr = df.groupby("step")["lr"].first().to_numpy()
    np.testing.assert_allclose(lr, [1e-3 * (t / 4 if t < 4 else (16 - t) / 12) for t in range(16)], rtol=1e-12)
    assert df.groupby("step")["loss"].first().notna().sum() == 4
    trace_files = [f for f in files_under(tmp_path / "hf") if f.startswith("runs/hf-trace")]
    assert trace_files == ["runs/hf-trace/.graftlab.lock", "runs/hf-trace/_graftlab.json",
                           "runs/hf-trace/part-000000000000.parquet"]
