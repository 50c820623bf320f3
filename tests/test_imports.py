"""Commands that do not train start without torch: `import graftlab.cli.app`, `info`, `distill`, `plot`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_traces" / "bert-adam-sgd-bs16"

RUN = """
import sys
sys.argv = ["graftlab", *{args!r}]
from graftlab.cli.app import main
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
heavy = [m for m in ("torch", "transformers", "graftlab.graft.optimizer", "graftlab.record.recorder") if m in sys.modules]
print("HEAVY", heavy)
"""


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_importing_the_cli_and_the_package_does_not_import_torch():
    out = run("import sys, graftlab, graftlab.cli.app, graftlab.trace, graftlab.distill.pipeline, graftlab.kinds\n"
              "print('HEAVY', [m for m in ('torch',) if m in sys.modules])")
    assert "HEAVY []" in out


@pytest.mark.parametrize("args", [
    ["--help"],
    ["info", str(SAMPLE)],
    ["distill", str(SAMPLE), "--window", "500", "-o", "{tmp}/c.json"],
    ["plot", str(SAMPLE), "--figure", "5", "--steps", "200", "-o", "{tmp}/f5.png"],
], ids=["help", "info", "distill", "plot"])
def test_commands_that_do_not_train_do_not_import_torch(tmp_path, args):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert "HEAVY []" in run(RUN.format(args=args))


def test_lazy_public_names_still_work():
    out = run("import sys, graftlab\nassert 'torch' not in sys.modules\n"
              "print(graftlab.Graft.__name__, graftlab.Recorder.__name__, graftlab.distill_trace.__name__,\n"
              "      graftlab.read_trace.__name__, 'Graft' in dir(graftlab), 'torch' in sys.modules)")
    assert out.split() == ["Graft", "Recorder", "distill", "read_trace", "True", "True"]


def test_stage_packages_are_modules_and_their_functions_are_named_apart():
    import types

    import graftlab
    import graftlab.distill as stage  # the package, as for every stage

    assert isinstance(stage, types.ModuleType) and stage is graftlab.distill
    assert graftlab.distill_trace is stage.distill is stage.pipeline.distill
    assert graftlab.apply_corrections is graftlab.corrections.apply
    assert graftlab.save_corrections is graftlab.corrections.save
    assert not {"apply", "save", "distill"} & set(graftlab.__all__)  # ambiguous at the top level


def test_subpackages_resolve_on_attribute_access_without_torch():
    out = run("import sys, graftlab\n"
              "print(graftlab.corrections.apply.__name__, graftlab.trace.read_trace.__name__,\n"
              "      graftlab.integrations.__name__, callable(graftlab.distill.distill), 'torch' in sys.modules,\n"
              "      graftlab.runs.RecordConfig.__name__)\n"
              "try:\n    graftlab.no_such_module\nexcept AttributeError as e:\n    print('AE', e)")
    lines = out.splitlines()
    assert lines[0].split() == ["apply", "read_trace", "graftlab.integrations", "True", "False", "RecordConfig"]
    assert lines[1] == "AE module 'graftlab' has no attribute 'no_such_module'"


def test_dir_lists_public_names_that_all_resolve():
    import graftlab

    names = dir(graftlab)
    assert not {"Any", "TYPE_CHECKING", "importlib", "sys", "types", "annotations", "pkgutil"} & set(names)
    assert {"corrections", "trace", "integrations", "graft", "record", "distill", "runs", "io", "Graft", "distill_trace",
            "__version__"} <= set(names)
    assert all(not n.startswith("_") for n in names if n != "__version__")
    for name in names:
        assert getattr(graftlab, name) is not None, name
