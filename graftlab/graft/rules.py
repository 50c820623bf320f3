"""Direct update rules: a child optimizer's step ``w_child - w_t``, computed from its own state.

Grafting needs each child's step, not its new weights. Taking ``(w_t + step) - w_t`` loses the step's
low bits when it is tiny next to the weights (the paper reports ratios of 1e5), so for the common
optimizers graftlab computes the step itself, with the same state tensors and the same state keys as
``torch.optim`` (a state dict written on either path loads on the other).

Each rule has one signature::

    rule(group, params, grads, state, out, scratch) -> None

``out[i]`` receives the step of ``params[i]`` and the optimizer state advances exactly as one
``optimizer.step()`` would advance it; parameters and gradients are not touched. ``scratch()``
returns a second buffer list aligned with ``params``, allocated once, for the few settings that
need two temporaries (see :func:`needs_scratch`). Complex tensors are handled as torch does: Adam,
AdamW, Adagrad and RMSprop work on ``torch.view_as_real`` views (real and imaginary parts are
separate reals), SGD is linear and works on the complex values.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

Scratch = Callable[[], list[Tensor]]

_UNSUPPORTED_FLAGS = ("fused", "capturable", "differentiable")


def _cpu_step(state: dict) -> Tensor:
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
    return state["step"]


def _advance(states: list[dict]) -> list:
    """Advance the CPU step counters and return them as floats (no device sync: they live on CPU).

    Under ``torch.compile`` they stay 0-d tensors, as in torch.optim, so that the bias corrections
    are traced instead of breaking the graph; float64 ones, so that ``1 - 0.999**k`` keeps the
    digits the eager floats have.
    """
    steps = [_cpu_step(s) for s in states]
    torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    if torch.compiler.is_compiling():
        return [s.to(torch.float64) for s in steps]
    return [float(s) for s in steps]


def _real(tensors: list[Tensor]) -> list[Tensor]:
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _any_complex(params: list[Tensor]) -> bool:
    return any(p.is_complex() for p in params)


def _plain(group: dict) -> bool:
    """True when the rule may read the gradients as they are (no coupled weight decay, no maximize)."""
    return group.get("weight_decay", 0.0) == 0 and not group.get("maximize", False)


# On CPU the step is bound by memory bandwidth: an out= op per tensor writes the buffer once, where a
# foreach copy followed by an in-place op reads and writes it twice. On accelerators the foreach
# forms keep the kernel launches per step independent of the number of tensors.
def _per_tensor(out: list[Tensor]) -> bool:
    return out[0].device.type == "cpu"


def _sqrt_into(out: list[Tensor], src: list[Tensor]) -> None:
    """out <- sqrt(src)."""
    if _per_tensor(out):
        for o, x in zip(out, src):
            torch.sqrt(x, out=o)
    else:
        torch._foreach_copy_(out, src)
        torch._foreach_sqrt_(out)


def _div_into(out: list[Tensor], num: list[Tensor]) -> None:
    """out <- num / out."""
    if _per_tensor(out):
        for o, n in zip(out, num):
            torch.div(n, o, out=o)
    else:
        torch._foreach_reciprocal_(out)
        torch._foreach_mul_(out, num)


def _real_scratch(scratch: Scratch) -> Scratch:
    return lambda: _real(scratch())


def _load_grads(out: list[Tensor], grads: list[Tensor], params: list[Tensor], group: dict) -> None:
    """out <- (maximize ? -g : g) + weight_decay * w (coupled weight decay)."""
    torch._foreach_copy_(out, grads)
    if group.get("maximize", False):
        torch._foreach_neg_(out)
    wd = group.get("weight_decay", 0.0)
    if wd != 0:
        torch._foreach_add_(out, params, alpha=wd)


def sgd(group: dict, params, grads, state, out, scratch) -> None:
    momentum, dampening, lr = group["momentum"], group["dampening"], group["lr"]
    g = grads
    if momentum == 0 or not _plain(group) or group.get("nesterov", False):
        _load_grads(out, grads, params, group)
        g = out
    if momentum != 0:
        old = [i for i, s in enumerate(state) if s.get("momentum_buffer") is not None]
        bufs = [state[i]["momentum_buffer"] for i in old]
        if bufs:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [g[i] for i in old], alpha=1 - dampening)
        for s, d in zip(state, g):
            if s.get("momentum_buffer") is None:  # first step: the buffer starts as the gradient
                s["momentum_buffer"] = d.detach().clone()
        all_bufs = [s["momentum_buffer"] for s in state]
        if group.get("nesterov", False):
            torch._foreach_add_(out, all_bufs, alpha=momentum)
        elif _per_tensor(out):
            for o, b in zip(out, all_bufs):
                torch.mul(b, -lr, out=o)
            return
        else:
            torch._foreach_copy_(out, all_bufs)
    torch._foreach_mul_(out, -lr)


def adam(group: dict, params, grads, state, out, scratch, *, decoupled: Optional[bool] = None) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    if decoupled is None:
        decoupled = bool(group.get("decoupled_weight_decay", False))
    amsgrad = group.get("amsgrad", False)
    for s, p in zip(state, params):
        if "exp_avg" not in s:
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    steps = _advance(state)
    exp_avgs = [s["exp_avg"] for s in state]
    exp_avg_sqs = [s["exp_avg_sq"] for s in state]
    second = [s["max_exp_avg_sq"] for s in state] if amsgrad else exp_avg_sqs
    if _any_complex(params):
        params, grads, out = _real(params), _real(grads), _real(out)
        exp_avgs, exp_avg_sqs, second = _real(exp_avgs), _real(exp_avg_sqs), _real(second)

    g = grads
    if group.get("maximize", False) or (wd != 0 and not decoupled):
        torch._foreach_copy_(out, grads)
        if group.get("maximize", False):
            torch._foreach_neg_(out)
        if wd != 0 and not decoupled:
            torch._foreach_add_(out, params, alpha=wd)
        g = out
    torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1 - beta2)

    if amsgrad:
        torch._foreach_maximum_(second, exp_avg_sqs)
    # out <- -step_size * m / (sqrt(v) / sqrt(bc2) + eps), built in place to need no second buffer
    _sqrt_into(out, second)
    torch._foreach_div_(out, [(1 - beta2**k) ** 0.5 for k in steps])
    torch._foreach_add_(out, eps)
    _div_into(out, exp_avgs)
    torch._foreach_mul_(out, [-lr / (1 - beta1**k) for k in steps])
    if wd != 0 and decoupled:
        torch._foreach_add_(out, params, alpha=-lr * wd)


def adamw(group: dict, params, grads, state, out, scratch) -> None:
    adam(group, params, grads, state, out, scratch, decoupled=True)


def adagrad(group: dict, params, grads, state, out, scratch) -> None:
    lr, lr_decay, eps = group["lr"], group["lr_decay"], group["eps"]
    for s, p in zip(state, params):
        if "sum" not in s:
            init = group.get("initial_accumulator_value", 0.0)
            s["sum"] = torch.full_like(p, init, memory_format=torch.preserve_format)
    steps = _advance(state)
    sums = [s["sum"] for s in state]
    if _any_complex(params):
        params, grads, out, sums = _real(params), _real(grads), _real(out), _real(sums)
        scratch = _real_scratch(scratch)
    g = grads if _plain(group) else scratch()
    if g is not grads:
        _load_grads(g, grads, params, group)
    torch._foreach_addcmul_(sums, g, g, value=1)
    _sqrt_into(out, sums)
    torch._foreach_add_(out, eps)
    _div_into(out, g)
    torch._foreach_mul_(out, [-lr / (1 + (k - 1) * lr_decay) for k in steps])


def rmsprop(group: dict, params, grads, state, out, scratch) -> None:
    lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
    momentum, centered = group["momentum"], group["centered"]
    for s, p in zip(state, params):
        if "square_avg" not in s:
            s["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if momentum > 0:
                s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if centered:
                s["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    _advance(state)
    square_avgs = [s["square_avg"] for s in state]
    grad_avgs = [s["grad_avg"] for s in state] if centered else []
    bufs = [s["momentum_buffer"] for s in state] if momentum > 0 else []
    if _any_complex(params):
        params, grads, out = _real(params), _real(grads), _real(out)
        square_avgs, grad_avgs, bufs = _real(square_avgs), _real(grad_avgs), _real(bufs)
        scratch = _real_scratch(scratch)
    g = grads if _plain(group) else scratch()
    if g is not grads:
        _load_grads(g, grads, params, group)
    torch._foreach_mul_(square_avgs, alpha)
    torch._foreach_addcmul_(square_avgs, g, g, value=1 - alpha)
    torch._foreach_copy_(out, square_avgs)
    if centered:
        torch._foreach_lerp_(grad_avgs, g, 1 - alpha)
        torch._foreach_addcmul_(out, grad_avgs, grad_avgs, value=-1)
    torch._foreach_sqrt_(out)
    torch._foreach_add_(out, eps)
    _div_into(out, g)
    if momentum > 0:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, out)
        torch._foreach_copy_(out, bufs)
    torch._foreach_mul_(out, -lr)


RULES: dict[type, Callable] = {
    torch.optim.SGD: sgd,
    torch.optim.Adam: adam,
    torch.optim.AdamW: adamw,
    torch.optim.Adagrad: adagrad,
    torch.optim.RMSprop: rmsprop,
}


def rule_for(optimizer: torch.optim.Optimizer) -> Optional[Callable]:
    """The direct rule for ``optimizer``, or None when only the generic path can step it.

    Only exact classes qualify (a subclass may change the update), with plain float hyperparameters
    and none of the fused / capturable / differentiable variants.
    """
    rule = RULES.get(type(optimizer))
    if rule is None:
        return None
    for group in optimizer.param_groups:
        if any(group.get(flag) for flag in _UNSUPPORTED_FLAGS):
            return None
        for key in ("lr", "betas", "weight_decay", "momentum", "eps"):
            value = group.get(key)
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, Tensor) for v in values):
                return None
    return rule


def needs_scratch(rule: Optional[Callable], groups: list[dict]) -> bool:
    """True when ``rule`` asks for its second buffer on some of ``groups`` (Adagrad and RMSprop with
    coupled weight decay or ``maximize``), so that a caller can allocate it up front."""
    return rule in (adagrad, rmsprop) and not all(_plain(g) for g in groups)


def step_owner(optimizer: torch.optim.Optimizer) -> Optional[type]:
    """The torch.optim class whose ``step`` ``optimizer`` runs (its own class or a base whose
    ``step`` a subclass keeps), or None when the ``step`` is defined outside torch.optim."""
    owner = next((c for c in type(optimizer).__mro__ if "step" in vars(c)), None)
    return owner if owner is not None and owner.__module__.startswith("torch.optim.") else None


_SPARSE_STEPS = (torch.optim.SGD, torch.optim.Adagrad, torch.optim.SparseAdam)


def gradient_refusal(optimizer: torch.optim.Optimizer, sparse: bool, dense: bool) -> Optional[str]:
    """Why ``optimizer.step()`` would raise on gradients of these layouts, or None when it would not
    (or when nothing is known: a class that defines its own ``step`` outside torch.optim).

    torch.optim's classes (and subclasses that keep their ``step``) check the layout while they step,
    after earlier parameter groups have already moved; asking first keeps a refused step from
    changing anything.
    """
    owner = step_owner(optimizer)
    if owner is None:
        return None
    if owner is torch.optim.SparseAdam:
        return "takes sparse gradients only" if dense else None
    if not sparse or owner is torch.optim.SGD:
        return None
    if owner is torch.optim.Adagrad:
        if any(g.get("weight_decay", 0) for g in optimizer.param_groups):
            return "takes sparse gradients only with weight_decay=0"
        return None
    if owner in _SPARSE_STEPS:
        return None
    return "does not take sparse gradients"
