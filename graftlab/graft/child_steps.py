"""How :class:`~graftlab.Graft` obtains each child's step ``w_child - w_t``, on its two paths.

- :func:`direct`: the child's update rule (:mod:`graftlab.graft.rules`) writes the step into a buffer
  from the child's own state; the weights are not touched. The child's ``step()`` does not run, so
  its step hooks (and the global optimizer hooks) are fired here, as ``step()`` would fire them.
- :func:`generic`: the child's own ``step()`` moves the weights from ``w_t`` and the step is read
  back as ``w - w_t``. A child that may edit ``p.grad`` in place (clipping or centralisation
  inside its ``step``: any ``step`` not defined by torch.optim, whose optimizers only read
  gradients) steps on its own copy of ``g_t``, so that it changes neither the other child's
  gradient nor the training loop's; :func:`save` keeps the loop's gradient tensors and
  :func:`restore_grads` puts them back.
"""
from __future__ import annotations

import inspect
import re
from itertools import chain
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from graftlab.graft import rules as updates
from graftlab.errors import GraftlabError


def real_views(tensors: list[Tensor]) -> list[Tensor]:
    """Complex tensors as ``(..., 2)`` real views: norms and signs treat real and imaginary parts
    as separate reals, as torch.optim does."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


@torch._disable_dynamo  # eager: compiled code would drop the attribute update
def _allocate(graft: Any, name: str, like: list[Tensor]) -> list[Tensor]:
    """A buffer list first needed after construction (rare: options or gradients changed kind)."""
    setattr(graft, name, [torch.empty_like(t, memory_format=torch.preserve_format) for t in like])
    return getattr(graft, name)


# -- direct path -----------------------------------------------------------------------------------
def allocate_buffers(graft: Any, params: list[Tensor]) -> None:
    """The generic path's buffers for a fused Graft (which builds none): ``w_t`` and, per
    coordinate, ``|M's step|``."""
    _allocate(graft, "_buf", params)
    if graft.partition.elementwise:
        _allocate(graft, "_abs_m", params)


def _scratch(graft: Any) -> list[Tensor]:
    if graft._scratch is None:  # a group's options changed after construction to need it
        return _allocate(graft, "_scratch", graft._norms.locals(graft._params))
    return graft._scratch


def before_step(opt: Optimizer) -> None:
    """What ``opt.step()`` does first: fire its (and the global) step pre-hooks."""
    for hook in chain(_global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()):
        hook(opt, (opt,), {})


def after_step(opt: Optimizer) -> None:
    """What ``opt.step()`` does last: tell a scheduler on ``opt`` that it stepped, fire its post-hooks."""
    opt._opt_called = True
    for hook in chain(opt._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        hook(opt, (opt,), {})


def direct(graft: Any, opt: Optimizer, rule: Callable, out: list[Tensor]) -> list[Tensor]:
    """out <- the step ``opt`` would take now; advances ``opt``'s state, not the weights."""
    before_step(opt)
    slot = graft._slot
    for group in opt.param_groups:
        ps = [p for p in group["params"] if p.grad is not None]
        if len(ps) != len(group["params"]):
            for p in group["params"]:
                if p.grad is None:
                    out[slot[id(p)]].zero_()
        if not ps:
            continue
        idx = [slot[id(p)] for p in ps]
        outs = [out[i] for i in idx]
        scratch = lambda: [_scratch(graft)[i] for i in idx]  # noqa: E731
        graft._norms.run_rule(rule, group, ps, [opt.state[p] for p in ps], outs, scratch)
    after_step(opt)
    return out


def fused(graft: Any) -> None:
    """The direct step of both children and the grafted write in two fused passes
    (:mod:`graftlab.graft.fused`): the same result as :func:`direct` for each child, then the combine."""
    children = (graft.magnitude, graft.direction)
    for opt in children:
        before_step(opt)
    sq = graft._fused.squared_norms()
    graft._fused.apply(graft._factors(*graft._norms.from_squares(sq)))
    for opt in children:
        after_step(opt)


# -- generic path ----------------------------------------------------------------------------------
def save(graft: Any, params: list[Tensor]) -> list[Optional[Tensor]]:
    """Keep ``w_t`` in the graft's buffer; return the gradient tensors the training loop set."""
    if graft._buf is None:  # a fused Graft builds no buffers: the first generic step allocates them
        allocate_buffers(graft, params)
    torch._foreach_copy_(graft._buf, params)
    return [p.grad for p in graft._params]


def restore_grads(params: list[Tensor], grads: list[Optional[Tensor]]) -> None:
    for p, g in zip(params, grads):
        if p.grad is not g:
            p.grad = g


def _give_grads(graft: Any, grads: list[Optional[Tensor]]) -> None:
    """Point every ``p.grad`` at a fresh copy of ``g_t`` (dense ones in the graft's buffers)."""
    bufs, local = graft._grads, graft._norms.locals
    dense = [i for i, g in enumerate(grads) if g is not None and not g.is_sparse]
    if dense:
        torch._foreach_copy_(local([bufs[i] for i in dense]), local([grads[i] for i in dense]))
    for i, (p, g) in enumerate(zip(graft._params, grads)):
        if g is None:
            continue
        copy = g.clone() if g.is_sparse else bufs[i]
        if p.grad is not copy:
            p.grad = copy


def keeps_gradients(opt: Optimizer) -> bool:
    """Whether ``opt.step()`` leaves ``p.grad`` as it found it: torch.optim's own ``step``
    implementations (and subclasses that keep them) only read gradients; a Graft puts them back."""
    own = getattr(opt, "_keeps_gradients", None)
    return bool(own) if own is not None else updates.step_owner(opt) is not None


def generic(graft: Any, opt: Optimizer, params: list[Tensor], *, first: bool, grads) -> list[Tensor]:
    """Let ``opt`` step from ``w_t`` on ``g_t`` (its own copy if it may edit it); ``params`` then
    hold its step."""
    w0 = graft._buf
    if not first:
        torch._foreach_copy_(params, w0)
    if keeps_gradients(opt):
        restore_grads(graft._params, grads)  # the loop's tensors, if the other child had copies
    else:
        _give_grads(graft, grads)
    opt.step()
    torch._foreach_sub_(params, w0)
    return params


# -- checks made before anything moves ---------------------------------------------------------------
_REFUSES_NO_CLOSURE = re.compile(r"if\s+closure\s+is\s+None\s*:\s*(#[^\n]*)?\n\s*raise\b")


def needs_closure(opt: Optimizer) -> bool:
    """Whether ``opt.step`` cannot run without a closure: its ``closure`` argument has no default
    (torch.optim.LBFGS), or its code raises when none is given (SAM and its kin in
    pytorch_optimizer). Such an optimizer re-evaluates the loss at weights of its own choosing, so
    it cannot step from the ``(w_t, g_t)`` both children share."""
    step = getattr(type(opt), "step", None)
    if step is None or getattr(opt, "_keeps_gradients", False):  # a Graft takes any closure
        return False
    try:
        param = inspect.signature(step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    if param is not None and param.default is inspect.Parameter.empty:
        return True
    try:
        source = inspect.getsource(inspect.unwrap(step))
    except (OSError, TypeError):
        return False
    return bool(_REFUSES_NO_CLOSURE.search(source))


def refusal(opt: Optimizer, sparse: bool, dense: bool) -> Optional[str]:
    """Why ``opt`` would refuse gradients of these layouts, or None. A Graft (a child of another
    Graft) answers about its own path and children."""
    if hasattr(opt, "magnitude") and hasattr(opt, "direction") and hasattr(opt, "_path_choice"):
        if sparse and opt._path_choice == "direct":
            return "has path='direct', which takes no sparse gradients"
        for role in ("magnitude", "direction"):
            child = getattr(opt, role)
            why = refusal(child, sparse, dense)
            if why:
                return f"holds a {role} optimizer {type(child).__name__} that {why}"
        return None
    return updates.gradient_refusal(opt, sparse, dense)


def check_gradients(graft: Any, sparse: bool) -> None:
    """Raise GraftlabError when a child is known to refuse this step's gradients.

    torch.optim's optimizers check while they step, after earlier groups have moved; checking first
    keeps a refused step from changing any weight or state.
    """
    grads = [p.grad for p in graft._params if p.grad is not None]
    dense = any(not g.is_sparse for g in grads)
    for role in ("magnitude", "direction"):
        child = getattr(graft, role)
        why = refusal(child, sparse, dense)
        if why:
            kinds = "sparse" if sparse else "dense"
            raise GraftlabError(
                f"{role} optimizer {type(child).__name__} {why}, and this step has {kinds} gradients "
                "(choose optimizers that take them, e.g. SGD, Adagrad or SparseAdam for sparse ones)"
            )


def takes_direct_path(graft: Any) -> bool:
    """Whether this step takes the direct path: where both children have rules and no gradient is
    sparse (the rules take dense ones). Raises GraftlabError, before anything changes, for
    gradients a child refuses."""
    sparse = any(p.grad is not None and p.grad.is_sparse for p in graft._params)
    if sparse or graft._sparse_only:
        check_gradients(graft, sparse)
    if not sparse:
        return graft._rules is not None
    if graft._path_choice == "direct":
        raise GraftlabError("sparse gradients need path='generic' or path='auto'")
    if graft._grads is None and not all(map(keeps_gradients, (graft.magnitude, graft.direction))):
        _allocate(graft, "_grads", graft._params)  # the generic path's gradient copies, first needed now
    return False


def check_child_state(role: str, opt: Optimizer, state: Any) -> None:
    """Raise GraftlabError unless ``state`` has ``opt``'s group structure (what torch.optim checks,
    asked before either child loads)."""
    if isinstance(state, dict) and {"magnitude", "direction", "graft"} <= set(state):
        return  # a nested Graft's state: that Graft checks it
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list):
        raise GraftlabError(f"state_dict['{role}'] is not an optimizer state dict")
    saved = [len(g.get("params", ())) for g in groups]
    have = [len(g["params"]) for g in opt.param_groups]
    if saved != have:
        raise GraftlabError(
            f"state_dict['{role}'] has parameter groups of sizes {saved}; the {role} optimizer has {have}"
        )
