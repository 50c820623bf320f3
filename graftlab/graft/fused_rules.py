"""The per-tensor math of the fused grafted step (:mod:`graftlab.graft.fused`), one function per optimizer.

Each rule computes one parameter tensor's step ``w_child - w_t`` from the gradient and the child's
state, as plain tensor code that ``torch.compile`` fuses into one loop::

    step = rule(flags, g, p, states, s, update)

``flags`` (:class:`Flags`) are the settings that change the code; every number (learning rates,
bias corrections, betas) comes in the row of scalars ``s``, so that changing one never compiles
again. ``update=True`` advances ``states`` in place exactly as one ``torch.optim`` step would
(same state keys as torch.optim and :mod:`graftlab.graft.rules`, which computes the same steps with
foreach ops); ``update=False`` recomputes the same step from the already advanced state. Complex
tensors arrive as ``torch.view_as_real`` views (real and imaginary parts are separate reals, as
in torch.optim).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

KINDS = {
    torch.optim.SGD: "sgd",
    torch.optim.Adam: "adam",
    torch.optim.AdamW: "adam",
    torch.optim.Adagrad: "adagrad",
    torch.optim.RMSprop: "rmsprop",
}


class Flags(NamedTuple):
    """The settings of one child's parameter group that change the kernel (all else is a scalar)."""

    kind: str
    maximize: bool = False
    weight_decay: bool = False  # coupled: g + wd * w
    decoupled: bool = False  # AdamW: step - lr * wd * w
    momentum: bool = False
    nesterov: bool = False
    amsgrad: bool = False
    centered: bool = False


# -- the rules: one tensor, ``s`` is this tensor's row of scalars -----------------------------------
# ``update=True`` advances the state in place and returns the step; ``update=False`` (pass 2)
# recomputes the same step from the state pass 1 advanced. Op order follows graftlab.graft.rules.
def _grad(f: Flags, g: Tensor, p: Tensor, wd: Tensor) -> Tensor:
    d = -g if f.maximize else g
    return d + wd * p if f.weight_decay else d


def _sgd(f: Flags, g, p, st, s, update: bool) -> Tensor:
    # s: -lr, momentum, weight of the gradient in the buffer (1 on its first step, else 1 - dampening), wd
    d = _grad(f, g, p, s[3])
    if not f.momentum:
        return d * s[0]
    (buf,) = st
    if update:
        buf.mul_(s[1]).add_(d * s[2])
    return (d + buf * s[1]) * s[0] if f.nesterov else buf * s[0]


def _adam(f: Flags, g, p, st, s, update: bool) -> Tensor:
    # s: 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^k), eps, -lr / (1 - beta1^k), wd, -lr * wd
    m, v = st[0], st[1]
    if update:
        d = _grad(f, g, p, s[6])
        m.lerp_(d, s[0])
        v.mul_(s[1]).add_(d * d * s[2])
        if f.amsgrad:
            st[2].copy_(torch.maximum(st[2], v))
    second = st[2] if f.amsgrad else v
    step = m / (second.sqrt() / s[3] + s[4]) * s[5]
    return step + p * s[7] if f.decoupled else step


def _adagrad(f: Flags, g, p, st, s, update: bool) -> Tensor:
    # s: -lr / (1 + (k - 1) * lr_decay), eps, wd
    d = _grad(f, g, p, s[2])
    (total,) = st
    if update:
        total.add_(d * d)
    return d / (total.sqrt() + s[1]) * s[0]


def _rmsprop(f: Flags, g, p, st, s, update: bool) -> Tensor:
    # s: alpha, 1 - alpha, eps, momentum, -lr, wd; st: square_avg[, momentum_buffer][, grad_avg]
    square = st[0]
    buf = st[1] if f.momentum else None
    if f.momentum and not update:
        return buf * s[4]
    d = _grad(f, g, p, s[5])
    if update:
        square.mul_(s[0]).add_(d * d * s[1])
    avg = square
    if f.centered:
        grad_avg = st[-1]
        if update:
            grad_avg.lerp_(d, s[1])
        avg = square - grad_avg * grad_avg
    step = d / (avg.sqrt() + s[2])
    if f.momentum:
        buf.mul_(s[3]).add_(step)
        step = buf
    return step * s[4]


RULES: dict[str, Callable] = {"sgd": _sgd, "adam": _adam, "adagrad": _adagrad, "rmsprop": _rmsprop}


def flags_of(opt: Optimizer, group: dict) -> Flags:
    kind = KINDS[type(opt)]
    wd = group.get("weight_decay", 0.0) != 0
    decoupled = kind == "adam" and (isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay")))
    return Flags(
        kind,
        maximize=bool(group.get("maximize", False)),
        weight_decay=wd and not decoupled,
        decoupled=wd and decoupled,
        momentum=group.get("momentum", 0.0) != 0,
        nesterov=bool(group.get("nesterov", False)),
        amsgrad=bool(group.get("amsgrad", False)),
        centered=bool(group.get("centered", False)),
    )


def state_keys(f: Flags) -> tuple[str, ...]:
    if f.kind == "sgd":
        return ("momentum_buffer",) if f.momentum else ()
    if f.kind == "adam":
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if f.amsgrad else ())
    if f.kind == "adagrad":
        return ("sum",)
    return ("square_avg",) + (("momentum_buffer",) if f.momentum else ()) + (("grad_avg",) if f.centered else ())


def init_states(f: Flags, group: dict, params: Sequence[Tensor], states: Sequence[dict]) -> list[bool]:
    """Create missing state tensors as torch.optim (and graftlab.graft.rules) would; True where an SGD
    momentum buffer starts this step (it then takes the gradient as it is, without dampening)."""
    fresh = [False] * len(params)
    for i, (p, s) in enumerate(zip(params, states)):
        if f.kind == "sgd":
            if f.momentum and s.get("momentum_buffer") is None:
                s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                fresh[i] = True
        elif f.kind == "adagrad":
            if "sum" not in s:
                init = group.get("initial_accumulator_value", 0.0)
                s["sum"] = torch.full_like(p, init, memory_format=torch.preserve_format)
        else:
            for key in state_keys(f):
                if key not in s:
                    s[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return fresh


def scalars(f: Flags, group: dict, steps: list[float], fresh: list[bool]) -> list[list[float]]:
    """One row of scalars per tensor (the per-tensor step counts enter the bias corrections)."""
    lr, wd = group["lr"], group.get("weight_decay", 0.0)
    if f.kind == "sgd":
        damp = 1.0 - group.get("dampening", 0.0)
        return [[-lr, group["momentum"], 1.0 if new else damp, wd] for new in fresh]
    if f.kind == "adam":
        b1, b2 = group["betas"]
        return [[1 - b1, b2, 1 - b2, (1 - b2**k) ** 0.5, group["eps"], -lr / (1 - b1**k), wd, -lr * wd] for k in steps]
    if f.kind == "adagrad":
        return [[-lr / (1 + (k - 1) * group["lr_decay"]), group["eps"], wd] for k in steps]
    a = group["alpha"]
    return [[a, 1 - a, group["eps"], group["momentum"], -lr, wd] for _ in steps]
