"""graftlab: learning-rate grafting (M#D) as a toolkit.

The pipeline, one package per stage, each importing only the stages before it::

    graft/ (M#D optimizer) -> record/ (Recorder) -> trace/ (the trace contract)
      -> distill/ (trace -> corrections) -> corrections/ (the corrections contract) -> runs/ (record and train runs)

Beside them: ``io/`` (durable writes, output checks), ``distributed/``, ``tasks/`` (the built-in
models and data), ``plots/`` (the paper's figures from a trace), ``integrations/`` (HF, Lightning,
TensorBoard); ``errors``, ``kinds`` (layer kinds) and ``names`` (parameter names under wrappers) are shared by all.

The command line (``graftlab.cli``, kept in ``cli/`` of the source tree) only parses options and
calls these.

The names below are imported on first use (PEP 562): ``import graftlab`` does not import torch, so
reading and distilling traces (``graftlab info``, ``distill``, ``plot``) starts in well under a second.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from typing import TYPE_CHECKING, Any

from graftlab.version import VERSION as __version__  # noqa: E402

# The public API, one deliberate list (name -> the module that defines it). The stages themselves are
# packages: graftlab.graft, .record, .trace, .distill, .corrections, .runs.
_LAZY = {
    "Graft": "graftlab.graft.optimizer",
    "Partition": "graftlab.graft.partition",
    "Recorder": "graftlab.record.recorder",
    "read_trace": "graftlab.trace",
    "read_metadata": "graftlab.trace",
    "distill_trace": "graftlab.distill.pipeline",
    "Corrections": "graftlab.corrections",
    "Applied": "graftlab.corrections",
    "GroupSource": "graftlab.corrections",
    "load_corrections": "graftlab.corrections",
    "save_corrections": "graftlab.corrections",
    "apply_corrections": "graftlab.corrections",
    "GraftlabError": "graftlab.errors",
}
# a public name that is another name in its module
_SOURCE = {"distill_trace": "distill", "save_corrections": "save", "apply_corrections": "apply"}

__all__ = sorted([*_LAZY, "__version__"])

if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from graftlab.corrections import Applied, Corrections, GroupSource, load_corrections  # noqa: F401
    from graftlab.corrections import apply as apply_corrections, save as save_corrections  # noqa: F401
    from graftlab.distill.pipeline import distill as distill_trace  # noqa: F401
    from graftlab.errors import GraftlabError  # noqa: F401
    from graftlab.graft.optimizer import Graft  # noqa: F401
    from graftlab.graft.partition import Partition  # noqa: F401
    from graftlab.record.recorder import Recorder  # noqa: F401
    from graftlab.trace import read_metadata, read_trace  # noqa: F401


def _submodule(name: str) -> Any:
    """The public submodule ``graftlab.<name>`` (imported now), or None if there is none."""
    if name.startswith("_"):
        return None
    full = f"{__name__}.{name}"
    if full not in sys.modules:
        try:
            if importlib.util.find_spec(full) is None:
                return None
        except (ImportError, ValueError):
            return None
    return importlib.import_module(full)


def __getattr__(name: str) -> Any:
    # a name defined in a submodule, or a submodule itself (graftlab.corrections.apply without
    # importing graftlab.corrections first), each imported on first use
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), _SOURCE.get(name, name))
    else:
        value = _submodule(name)
        if value is None:
            raise AttributeError(f"module 'graftlab' has no attribute {name!r}")
    globals()[name] = value
    return value


def _public_modules() -> set[str]:
    names = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    if importlib.util.find_spec(f"{__name__}.cli") is not None:  # installed from cli/ of the source tree
        names.add("cli")
    return names


def __dir__() -> list[str]:
    """The public names: the API above, the version and the submodules (not this file's imports)."""
    return sorted({*_LAZY, "__version__", *_public_modules()})
