"""Every notebook runs top to bottom (quick mode: the first few hundred steps of each sample trace)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["corrections.ipynb", "fig4.ipynb", "fig5_7.ipynb", "fig8.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    # the kernel inherits the environment: quick mode, one thread (and ipykernel's inline backend)
    monkeypatch.setenv("GRAFTLAB_NOTEBOOK_QUICK", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    # kernel "python3" with argv "python" starts this interpreter (jupyter_client swaps in sys.executable)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert figures, f"{path.name} drew no figure"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
