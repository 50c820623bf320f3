"""graftlab: learning-rate grafting (M#D) as a toolkit.

The pipeline, one module per stage::

    graft.py (M#D optimizer) -> record.py (Recorder) -> trace/ (the trace contract)
      -> distill.py (trace -> corrections) -> corrections/ (the corrections contract) -> runs/ (record and train runs)

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
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Applied": "graftlab.corrections",
    "Corrections": "graftlab.corrections",
    "GroupSource": "graftlab.corrections",
    "apply": "graftlab.corrections",
    "load_corrections": "graftlab.corrections",
    "save": "graftlab.corrections",
    "distill": "graftlab.distill",
    "GraftlabError": "graftlab.errors",
    "Graft": "graftlab.graft",
    "Partition": "graftlab.partition",
    "Recorder": "graftlab.record",
    "read_metadata": "graftlab.trace",
    "read_trace": "graftlab.trace",
}

__all__ = sorted([*_LAZY, "__version__"])

if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from graftlab.corrections import Applied, Corrections, GroupSource, apply, load_corrections, save  # noqa: F401
    from graftlab.distill import distill
    from graftlab.errors import GraftlabError
    from graftlab.graft import Graft
    from graftlab.partition import Partition
    from graftlab.record import Recorder
    from graftlab.trace import read_metadata, read_trace


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
        value = getattr(importlib.import_module(module), name)
    else:
        value = _submodule(name)
        if value is None:
            raise AttributeError(f"module 'graftlab' has no attribute {name!r}")
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``graftlab.distill`` is the function, as when it was imported eagerly: the import system binds
    each submodule on its package once imported, which must not replace a function of that name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY and value.__name__ == _LAZY[name]:
            value = getattr(value, name)  # the submodule of the same name: bind its function instead
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _public_modules() -> set[str]:
    names = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    if importlib.util.find_spec(f"{__name__}.cli") is not None:  # installed from cli/ of the source tree
        names.add("cli")
    return names


def __dir__() -> list[str]:
    """The public names: the API above, the version and the submodules (not this file's imports)."""
    return sorted({*_LAZY, "__version__", *_public_modules()})
