"""Parameter names of the user's own module, whatever wraps it (torch.compile, DDP, DataParallel).

``torch.compile(model)`` returns an ``OptimizedModule`` that holds the model as ``_orig_mod``, and
``DistributedDataParallel``/``DataParallel`` hold it as ``module``; ``named_parameters()`` of the
wrapper then says ``_orig_mod.0.weight`` or ``module.0.weight`` for the model's ``0.weight``. A trace
recorded on a compiled model must name its groups as the uncompiled model does, or the corrections
distilled from it match nothing when they are applied to the model users evaluate. The names here
drop a wrapper's own segment only where the module at that point *is* such a wrapper (by type), so
a real submodule that happens to be called ``module`` keeps its name. A compiled submodule
(``model.encoder = torch.compile(model.encoder)``) loses its ``_orig_mod`` segment the same way.
This is what Hugging Face Accelerate's ``extract_model_from_parallel`` peels off a model.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator

from torch import nn

_ORIG_MOD = "_orig_mod"  # torch._dynamo.eval_frame.OptimizedModule's attribute for the compiled module


def _compiled_type() -> Any:
    """``OptimizedModule``, when torch.compile has been imported (else nothing can be compiled)."""
    module = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(module, "OptimizedModule", None)


def _parallel_types() -> tuple[type, ...]:
    from torch.nn import DataParallel
    from torch.nn.parallel import DistributedDataParallel

    return DataParallel, DistributedDataParallel


def inner_attribute(module: nn.Module) -> str | None:
    """The attribute under which a wrapper holds the user's module (None: not a wrapper)."""
    compiled = _compiled_type()
    if compiled is not None and isinstance(module, compiled):
        return _ORIG_MOD
    if isinstance(module, _parallel_types()):
        return "module"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside any stack of torch.compile / DDP / DataParallel wrappers."""
    attr = inner_attribute(model)
    while attr is not None:
        model = getattr(model, attr)
        attr = inner_attribute(model)
    return model


def own_name(model: nn.Module, name: str) -> str:
    """``name`` (a parameter or module name under ``model``) without the wrappers' segments."""
    if not name:
        return name
    kept, module = [], model
    parts = name.split(".")
    for i, part in enumerate(parts):
        children = getattr(module, "_modules", None) if module is not None else None
        child = children.get(part) if children else None
        if child is not None and inner_attribute(module) == part:
            module = child  # the wrapper's own segment
            continue
        kept.append(part)
        module = child
    return ".".join(kept)


def named_parameters(model: nn.Module) -> list[tuple[str, Any]]:
    """``model.named_parameters()`` named as the unwrapped model names them."""
    return [(own_name(model, n), p) for n, p in model.named_parameters()]


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without the wrappers themselves, named as the unwrapped model names them."""
    for n, m in model.named_modules():
        if inner_attribute(m) is None:
            yield own_name(model, n), m

