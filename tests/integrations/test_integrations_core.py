"""The integrations stay optional: the core imports none of their libraries, and a missing one is
an ImportError that names the extra to install."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from graftlab.integrations import require

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = ("transformers", "accelerate", "lightning", "pytorch_lightning", "lightning_fabric", "tensorboard")


def test_core_modules_import_none_of_the_optional_libraries():
    code = (
        "import sys, pkgutil, importlib, graftlab, graftlab.integrations\n"
        "for m in pkgutil.walk_packages(graftlab.__path__, 'graftlab.'):\n"
        "    if not m.name.startswith('graftlab.integrations.') and not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "import cli.app\n"
        f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({OPTIONAL!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_missing_library_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'graftlab\[hf\]'"):
        require("no_such_library_graftlab_test", "hf", "graftlab.integrations.hf")
    assert require("json", "hf", "x").dumps([]) == "[]"
