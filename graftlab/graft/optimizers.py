"""Optimizers by name, their hyperparameters from ``key=value`` strings, and a JSON description.

    >>> hp = parse_hparams(["momentum=0.9", "nesterov=true"])
    >>> opt = make_optimizer("sgd", model.parameters(), lr=0.1, **hp)
    >>> describe(opt)["hyperparameters"]["momentum"]
    0.9

The names map to ``torch.optim`` classes. LAMB is not offered: the PyPI implementations are either
unmaintained (``torch-optimizer``, ``pytorch-lamb``) or come with a large framework that pins its own
PyTorch build (``timm`` needs ``torchvision``); a user can still graft any ``torch.optim.Optimizer``
through the Python API.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Iterable, Sequence

import torch
from torch.optim import Optimizer

from graftlab.errors import GraftlabError
from graftlab.io.jsonable import jsonable

OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
}

# Implementation switches that change speed, not the algorithm; accepted but not advertised.
_IMPLEMENTATION_ARGS = {"foreach", "fused", "capturable", "differentiable"}


def hparam_names(name: str) -> list[str]:
    """The hyperparameters the named optimizer accepts (besides ``lr``)."""
    cls = _optimizer_class(name)
    sig = inspect.signature(cls.__init__)
    return [p for p in sig.parameters if p not in ("self", "params", "lr") and p not in _IMPLEMENTATION_ARGS]


def _optimizer_class(name: str) -> type[Optimizer]:
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise GraftlabError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[key]


def make_optimizer(
    name: str, params: Iterable[Any], lr: float, **hparams: Any
) -> Optimizer:
    """Build ``torch.optim`` optimizer ``name`` over ``params`` (tensors or param-group dicts).

    Param-group dicts may carry their own ``lr`` and extra keys (such as ``name``); ``lr`` is the
    default for groups without one. Unknown hyperparameters raise :class:`GraftlabError` listing the
    valid ones.
    """
    cls = _optimizer_class(name)
    if lr is None or not math.isfinite(float(lr)) or float(lr) < 0:
        raise GraftlabError(f"learning rate must be a finite number >= 0, got {lr}")
    valid = hparam_names(name)
    unknown = [k for k in hparams if k not in valid and k not in _IMPLEMENTATION_ARGS]
    if unknown:
        raise GraftlabError(
            f"{name} has no hyperparameter {', '.join(map(repr, unknown))}: valid ones are {', '.join(valid)}"
        )
    if "betas" in hparams:
        hparams["betas"] = tuple(hparams["betas"])
    params = list(params)
    if not params:
        raise GraftlabError("the optimizer got no parameters")
    try:
        opt = cls(params, lr=float(lr), **hparams)
    except (ValueError, TypeError) as err:  # torch's own range checks (negative momentum, ...)
        raise GraftlabError(f"{name}: {err}") from None
    switches = {k: v for k, v in hparams.items() if k in _IMPLEMENTATION_ARGS and v}
    if switches:
        _probe(cls, name, opt, switches)
    return opt


def _probe(cls: type[Optimizer], name: str, opt: Optimizer, switches: dict[str, Any]) -> None:
    """GraftlabError when an implementation switch (``capturable=True``, ``fused=True``) does not run
    on the parameters' device: torch checks some only at the first step (an AssertionError then,
    after a run has started and its outputs were opened). One step on a one-element copy shows it."""
    p = next((p for g in opt.param_groups for p in g["params"]), None)
    if p is None:
        return
    probe = torch.zeros(1, dtype=p.dtype, device=p.device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        cls([probe], lr=0.0, **switches).step()
    except Exception as err:  # noqa: BLE001 - whatever torch raises, the switch cannot run here
        flags = ", ".join(f"{k}={v!r}" for k, v in switches.items())
        text = " ".join(str(err).split())[:200] or type(err).__name__
        raise GraftlabError(f"{name}: {flags} does not run on {p.device.type} parameters ({text})") from None


def _parse_scalar(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        raise GraftlabError(f"cannot read {text!r} as a number or true/false") from None


def parse_hparams(items: Sequence[str] | None) -> dict[str, Any]:
    """``["momentum=0.9", "betas=0.9,0.98", "nesterov=true"]`` -> ``{"momentum": 0.9, ...}``.

    Values are numbers, ``true``/``false``/``none``, or comma-separated numbers (a tuple).
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise GraftlabError(f"hyperparameter {item!r} is not of the form name=value")
        try:
            parts = [_parse_scalar(v) for v in value.split(",")]
        except GraftlabError as err:
            raise GraftlabError(f"hyperparameter {key}: {err}") from None
        out[key] = tuple(parts) if len(parts) > 1 else parts[0]
    return out


def describe(optimizer: Optimizer) -> dict[str, Any]:
    """JSON-able ``{"class", "hyperparameters", "param_groups"}`` of an optimizer (for run metadata).

    Hyperparameters are the constructor defaults; when groups carry different learning rates (as with
    per-layer corrections) their range is added as ``lr_min``/``lr_max``. A :class:`graftlab.Graft`
    is described with both children.
    """
    children = {r: getattr(optimizer, r) for r in ("magnitude", "direction") if isinstance(getattr(optimizer, r, None), Optimizer)}
    hyper = {k: jsonable(v) for k, v in optimizer.defaults.items() if k not in _IMPLEMENTATION_ARGS}
    out: dict[str, Any] = {
        "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "hyperparameters": hyper,
        "param_groups": len(optimizer.param_groups),
    }
    lrs = [g.get("initial_lr", g.get("lr")) for g in optimizer.param_groups if "lr" in g]
    lrs = [float(v) for v in lrs if isinstance(v, (int, float))]
    if lrs and min(lrs) != max(lrs):
        out["lr_min"], out["lr_max"] = min(lrs), max(lrs)
    for role, child in children.items():
        out[role] = describe(child)
    return out
