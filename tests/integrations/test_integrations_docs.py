"""Every snippet of docs/trainers.md runs as written (the DDP one under torchrun, in
test_integrations_torchrun.py), and the README's "Use it with your trainer" section shows only them."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import graftlab

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "trainers.md"


def blocks(text: str) -> dict[str, list[str]]:
    """Python blocks of each ``## `` section, in order."""
    out: dict[str, list[str]] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        out[title] = re.findall(r"```python\n(.*?)```", section, re.S)
    return out


SNIPPETS = blocks(DOC.read_text())


def snippet(title: str, index: int = 0) -> str:
    return SNIPPETS[title][index]


def run(code: str, cwd: Path, monkeypatch, namespace: dict | None = None) -> str:
    monkeypatch.chdir(cwd)
    out = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(DOC), "exec"), namespace if namespace is not None else {})
    finally:
        torch.set_num_threads(threads)
    return out.getvalue()


def test_the_page_has_the_sections_the_readme_promises():
    assert {"Plain loop", "Several processes: torchrun, DDP, FSDP2", "accelerate", "Hugging Face Trainer",
            "PyTorch Lightning", "Live view in TensorBoard"} <= set(SNIPPETS)
    assert all(SNIPPETS[t] for t in SNIPPETS)


def test_plain_loop_and_read_back(tmp_path, monkeypatch):
    ns: dict = {}
    run(snippet("Plain loop"), tmp_path, monkeypatch, ns)
    printed = run(snippet("Plain loop", 1), tmp_path, monkeypatch, ns)
    df = graftlab.read_trace(tmp_path / "runs" / "plain")
    assert list(df.step.unique()) == list(range(40))
    assert list(df.group.unique()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(g in printed for g in df.group.unique())
    lr = df.groupby("step")["lr"].first().to_numpy()
    np.testing.assert_allclose(lr, [1e-3 * min(1.0, (t + 1) / 10) for t in range(40)])  # the warmup moved M's lr
    assert df["loss"].notna().all() and df["loss"].dtype == np.float64


def test_accelerate(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    printed = run(snippet("accelerate"), tmp_path, monkeypatch)
    assert printed.strip() == "32"
    df = graftlab.read_trace(tmp_path / "runs" / "accelerate")
    assert df["loss"].notna().all() and list(df.step.unique()) == list(range(8))


def test_hugging_face_trainer(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    code = snippet("Hugging Face Trainer")
    two = [line for line in code.splitlines() if "hf." in line and not line.startswith("from")]
    assert len(two) == 2  # graftlab's part of the script: two lines
    run(code, tmp_path, monkeypatch)
    df = graftlab.read_trace(tmp_path / "runs" / "hf-trace")
    assert list(df.step.unique()) == list(range(16))
    lr = df.groupby("step")["lr"].first().to_numpy()
    warm = [1e-3 * (t / 4 if t < 4 else (16 - t) / 12) for t in range(16)]  # HF's linear schedule
    np.testing.assert_allclose(lr, warm, rtol=1e-12)
    assert df.groupby("step")["loss"].first().notna().sum() == 4  # the logging steps


def test_lightning(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    run(snippet("PyTorch Lightning"), tmp_path, monkeypatch)
    df = graftlab.read_trace(tmp_path / "runs" / "lightning")
    assert list(df.step.unique()) == list(range(24))
    assert df["loss"].notna().all()
    lr = df.groupby("step")["lr"].first().to_numpy()
    np.testing.assert_allclose(lr, [1e-3 * min(1.0, (t + 1) / 10) for t in range(24)])


def test_tensorboard_live_view(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(snippet("Live view in TensorBoard"), tmp_path, monkeypatch)
    acc = EventAccumulator(str(tmp_path / "runs" / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert tags and all(len(acc.Scalars(t)) == 3 for t in tags)  # 30 steps, a flush every 10


def test_readme_section_shows_only_executed_snippets():
    text = (ROOT / "README.md").read_text()
    if "## Use it with your trainer" not in text:
        pytest.skip("README has no 'Use it with your trainer' section yet")
    section = text.split("## Use it with your trainer", 1)[1].split("\n## ", 1)[0]
    executed = [code for codes in SNIPPETS.values() for code in codes]
    for code in re.findall(r"```python\n(.*?)```", section, re.S):
        assert any(code.strip() in e for e in executed), f"README snippet not on docs/trainers.md:\n{code}"
    assert "docs/trainers.md" in section
