"""What a :class:`~graftlab.Graft` derives from its children's parameter groups, built at
construction and again whenever those groups change: the grafted tensors and their names, the
partition, the path, the norm seam (:mod:`graftlab.graft.norms`), the fused layout and the
parameter-sized buffers.

Training stacks change the parameters after the optimizer is built: ``model.double()`` and
``model.to(device)`` keep the Parameter objects but replace their data (dtype, device); accelerate
and FSDP2 swap the tensors in ``optimizer.param_groups`` (the Graft's groups are M's:
``AcceleratedOptimizer._switch_parameters``, ``fsdp2_switch_optimizer_parameters``).
:func:`signature` notices all of these at every step from tensor metadata alone (no host sync), and
:func:`build` then follows them: a swap in M's groups is carried into D's (:func:`carry_swaps`), and
everything derived is rebuilt, so no step ever runs on stale tensors or buffers.

Everything is validated before anything is replaced, so a refused change (tensors the two children
do not share, a tensor with no name, a child whose state lives elsewhere than its tensor) leaves
the Graft as it was.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from graftlab.graft import child_steps, rules as updates
from graftlab.errors import GraftlabError
from graftlab.graft.norms import PlainNorms
from graftlab.graft.partition import Partition, make_partition
from graftlab.graft.units import UnitPlan


def same_params(magnitude: Optimizer, direction: Optimizer) -> list[Tensor]:
    """M's tensors in M's order, after checking that D holds exactly the same ones."""
    pm = [p for group in magnitude.param_groups for p in group["params"]]
    pd = [p for group in direction.param_groups for p in group["params"]]
    if len({id(p) for p in pm}) != len(pm):
        raise GraftlabError("the magnitude optimizer holds a parameter twice")
    ids_m, ids_d = {id(p) for p in pm}, {id(p) for p in pd}
    if ids_m != ids_d:
        raise GraftlabError(
            "magnitude and direction must be built over the same parameters: "
            f"{len(ids_m - ids_d)} tensor(s) only in magnitude, {len(ids_d - ids_m)} only in direction"
        )
    if not pm:
        raise GraftlabError("the optimizers hold no parameters")
    return pm


def signature(graft: Any) -> tuple:
    """What everything :func:`build` derives depends on, read from tensor metadata only (no host
    sync): which tensors each child's groups hold, and M's tensors' dtype, device and shape (D's are
    the same objects once checked). With ``fused=True`` also where each tensor's data lives: the
    fused layout holds views of it, which ``p.data = ...`` would leave stale."""
    m = tuple(tuple((id(p), p.dtype, p.device, p.shape) for p in g["params"]) for g in graft.magnitude.param_groups)
    d = tuple(tuple(map(id, g["params"])) for g in graft.direction.param_groups)
    if getattr(graft, "_fused_choice", False):
        return m, d, data_pointers(graft)
    return m, d


def data_pointers(graft: Any) -> Optional[tuple]:
    """Where M's tensors' data lives; None inside torch.compile, which cannot trace ``data_ptr``
    (a graph break) and guards on the tensors it was traced with itself."""
    if torch.compiler.is_compiling():
        return None
    return tuple(p.data_ptr() for g in graft.magnitude.param_groups for p in g["params"])


def changed(graft: Any) -> bool:
    """Whether the tensors :func:`build` derived everything from have changed since (see
    :func:`signature`); the data pointers are not compared while compiling."""
    now, then = signature(graft), graft._signature
    if len(now) == 3 and now[2] is None and then is not None and len(then) == 3:
        return now[:2] != then[:2]
    return now != then


def carry_swaps(graft: Any) -> Optional[list[list[Tensor]]]:
    """Carry tensors swapped into M's groups into D's groups, in place; returns D's groups' previous
    tensor lists (to put back if the rebuild is refused), or None when nothing was swapped.

    A training stack swaps the tensors of ``optimizer.param_groups``, which on a Graft are M's:
    position by position, the tensor M now holds where it held another grafted before replaces
    that one wherever D still holds it, and takes over its name (so its group keeps its name).
    """
    old = graft._params
    pm = [p for g in graft.magnitude.param_groups for p in g["params"]]
    if not old or len(pm) != len(old):
        return None
    old_ids = {id(p) for p in old}
    swap = {id(o): n for o, n in zip(old, pm) if o is not n and id(n) not in old_ids}
    if not swap or not any(id(p) in swap for g in graft.direction.param_groups for p in g["params"]):
        return None
    previous = [list(g["params"]) for g in graft.direction.param_groups]
    for g in graft.direction.param_groups:
        g["params"] = [swap.get(id(p), p) for p in g["params"]]
    for o in old:
        if id(o) in swap:
            graft._names.follow(o, swap[id(o)])
    return previous


def _check_states(graft: Any, params: list[Tensor], locals_: list[Tensor]) -> None:
    """Raise GraftlabError when a torch.optim child already holds state for a tensor on another
    device or in another dtype than the tensor now has (moved or cast after steps were taken):
    torch.optim's own step would fail there too, part-way through the groups."""
    for role in ("magnitude", "direction"):
        opt = getattr(graft, role)
        if updates.step_owner(opt) is None:  # another library's optimizer keeps state as it likes
            continue
        for p, local in zip(params, locals_):
            for key, t in opt.state.get(p, {}).items():
                if not isinstance(t, Tensor) or t.dim() == 0 or key == "step":
                    continue
                t = getattr(t, "_local_tensor", t)
                if t.device != local.device or t.dtype != local.dtype:
                    name = graft._names.names_for([p])[0] if id(p) in graft._names._by_id else "a parameter"
                    raise GraftlabError(
                        f"{name} is now {local.dtype} on {local.device}, but the {role} optimizer "
                        f"{type(opt).__name__} holds its state {key!r} as {t.dtype} on {t.device}: cast or move "
                        "the model before the optimizers take a step, or load a state dict after moving it "
                        "(load_state_dict casts the state to the parameters)")


def importable(fn: Any) -> bool:
    """Whether pickle can store ``fn`` by reference (lambdas and local functions it cannot)."""
    return "<" not in getattr(fn, "__qualname__", "<")


def children_groups(graft: Any, param_group: Any, direction: dict) -> tuple[dict, dict]:
    """The groups :meth:`Graft.add_param_group` gives M (``param_group``) and D (the same tensors
    with ``direction``'s options); raises GraftlabError for a malformed group or tensors the
    optimizers already hold. ``(name, tensor)`` pairs name the tensors."""
    if not isinstance(param_group, dict) or "params" not in param_group:
        raise GraftlabError("param_group must be a dict with a 'params' entry")
    params = param_group["params"]
    if isinstance(params, set):
        raise GraftlabError("param_group['params'] must be an ordered collection, not a set")
    params = [params] if isinstance(params, Tensor) else list(params)
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    held = {id(p) for p in graft._params}
    if any(id(t) in held for t in tensors):
        raise GraftlabError("param_group holds tensors the optimizers already hold")
    graft._names.add(p for p in params if isinstance(p, tuple))

    def group(opt: Optimizer, options: dict) -> dict:
        # torch.optim wants (name, tensor) pairs exactly where the optimizer's groups have names
        named = bool(opt.param_groups) and "param_names" in opt.param_groups[0]
        names = graft._names.names_for(tensors) if named else None
        return {**options, "params": list(zip(names, tensors)) if named else list(tensors)}

    return group(graft.magnitude, param_group), group(graft.direction, direction)


def _partition(graft: Any, params: list[Tensor]) -> Partition:
    given = {}
    for group in graft.magnitude.param_groups:  # torch.optim keeps (name, tensor) pairs' names here
        given.update((id(p), n) for p, n in zip(group["params"], group.get("param_names", ())))
    names = graft._names.names_for(params, given, later=bool(graft._params))
    gran = graft._granularity
    if gran is None:  # unpickled without its label function: the labels seen so far
        known = graft._known_labels
        unknown = [n for n in names if n not in known]
        if unknown:
            raise GraftlabError(
                f"cannot label new tensors {unknown[:5]}: this Graft was unpickled without its granularity "
                "function (a lambda or local function cannot be pickled)"
            )
        gran = known.__getitem__
    split = getattr(graft, "_split", None)
    return make_partition(names, gran, [tuple(p.shape) for p in params], split, getattr(graft, "_slicing", None))


def _rules(graft: Any) -> Optional[tuple]:
    rules = (updates.rule_for(graft.magnitude), updates.rule_for(graft.direction))
    if graft._path_choice == "direct" and None in rules:
        bad = [type(o).__name__ for o, r in zip((graft.magnitude, graft.direction), rules) if r is None]
        raise GraftlabError(
            f"no direct path for {', '.join(bad)}: path='direct' supports "
            f"{', '.join(c.__name__ for c in updates.RULES)} without fused/capturable/differentiable"
        )
    return rules if (graft._path_choice != "generic" and None not in rules) else None


def _fused(graft: Any, params: list[Tensor], part: Partition, rules: Optional[tuple], norms, dtype: torch.dtype):
    """The fused direct step (:mod:`graftlab.graft.fused`) for ``fused=True``, after checking it applies."""
    if not getattr(graft, "_fused_choice", False):  # (a Graft pickled before fused= existed)
        return None
    if rules is None:
        bad = [type(o).__name__ for o in (graft.magnitude, graft.direction) if updates.rule_for(o) is None]
        why = f"no direct rule for {', '.join(bad)}" if bad else "path='generic' was chosen"
        raise GraftlabError(f"fused=True needs the direct path for both children: {why}")
    if not isinstance(norms, PlainNorms):
        raise GraftlabError("fused=True does not take sharded (DTensor) parameters; use fused=False")
    from graftlab.graft.fused import FusedDirect

    units = list(zip(part.unit_tensor, part.slices)) if part.split else None  # Q, K, V thirds: units
    return FusedDirect(graft.magnitude, graft.direction, params, units=units, elementwise=part.elementwise,
                       norm_dtype=dtype)


def _fits(buffer: Tensor, like: Tensor) -> bool:
    return (buffer.shape == like.shape and buffer.dtype == like.dtype and buffer.device == like.device
            and type(buffer) is type(like))


def _norms(params: list[Tensor], part: Partition, dtype: torch.dtype):
    if not all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in params):
        from graftlab.graft.shards import shard_layout  # only sharded tensors need it

        layout = shard_layout(params, part.tensor_group, len(part.group_names), dtype)
        if layout is not None:
            if part.split:
                if part.granularity in ("head", "vocab"):
                    raise GraftlabError(
                        f"sharded parameters cannot be grafted per head or per row yet (granularity="
                        f"{part.granularity!r}): use granularity='layer' with split=None under FSDP")
                raise GraftlabError(
                    "sharded parameters cannot be split into slices (fused Q/K/V): pass split=None to graft "
                    "whole tensors")
            return layout
    plan = UnitPlan(part.unit_tensor, part.slices, params[0].device) if part.split else None
    return PlainNorms(part.tensor_group, len(part.group_names), dtype, params[0].device, plan)


@torch._disable_dynamo  # eager even inside a compiled step: compiled code would drop these updates
def build(graft: Any) -> None:
    """(Re)build ``graft``'s partition, path, norm seam and buffers from its children's groups,
    after carrying a swap made in M's groups into D's (:func:`carry_swaps`).

    Buffers of tensors grafted before are kept where the tensor kept its shape, dtype and device;
    other tensors get new ones (allocated here, never in a step, so that ``torch.compile`` sees them
    from the first step). Raises GraftlabError, with D's groups put back and nothing else changed,
    when the children no longer hold the same tensors or a child's state does not fit its tensor.
    """
    previous = carry_swaps(graft)
    try:
        _build(graft)
    except BaseException:
        if previous is not None:
            for g, ps in zip(graft.direction.param_groups, previous):
                g["params"] = ps
        raise


def _build(graft: Any) -> None:
    params = same_params(graft.magnitude, graft.direction)
    partition = _partition(graft, params)
    rules = _rules(graft)
    wide = (torch.float64, torch.complex128)
    norm_dtype = torch.float64 if any(p.dtype in wide for p in params) else torch.float32
    norms = _norms(params, partition, norm_dtype)
    fused = _fused(graft, params, partition, rules, norms, norm_dtype)
    # validated: from here on the graft changes
    old = {id(p): i for i, p in enumerate(graft._params)}
    locals_ = norms.locals(params)
    device = locals_[0].device
    _check_states(graft, params, locals_)

    def buffers(name: str, like: list[Tensor], wanted: bool) -> Optional[list[Tensor]]:
        prev = getattr(graft, name, None)
        if not wanted:
            return None
        keep = {i: prev[old[id(p)]] for i, p in enumerate(params) if prev is not None and id(p) in old}
        keep = {i: b for i, b in keep.items() if _fits(b, like[i])}  # cast or moved: a new buffer
        return [keep[i] if i in keep else torch.empty_like(t, memory_format=torch.preserve_format)
                for i, t in enumerate(like)]

    children = (graft.magnitude, graft.direction)
    scratch = rules is not None and any(updates.needs_scratch(r, o.param_groups) for r, o in zip(rules, children))
    graft.partition = partition
    graft._rules = rules
    graft._norm_dtype = norm_dtype
    graft._norms = norms
    graft._plan = getattr(norms, "plan", None)
    graft._complex = any(p.is_complex() for p in params)
    graft._fused = fused
    # fused: no buffers (a step that takes the generic path allocates its own)
    graft._buf = buffers("_buf", locals_, fused is None)  # D's step (direct) or w_t (generic)
    graft._abs_m = buffers("_abs_m", locals_, partition.elementwise and fused is None)
    graft._scratch = buffers("_scratch", locals_, scratch and fused is None)
    # copies of g_t for a child that may edit p.grad, on the generic path: shaped as the parameters
    # (DTensors if sharded)
    copies = not all(map(child_steps.keeps_gradients, children))
    graft._grads = buffers("_grads", params, copies and (rules is None or getattr(graft, "_grads", None) is not None))
    graft._params = params
    graft._slot = {id(p): i for i, p in enumerate(params)}
    graft._signature = signature(graft)
    graft._index = None if partition.one_tensor_per_group else torch.tensor(partition.tensor_group, device=device)
    shape = (3, len(partition.group_names))
    stats = graft._stats
    if stats is None or stats.shape != shape or stats.dtype != norm_dtype or stats.device != device:
        graft._stats = torch.full(shape, float("nan"), device=device, dtype=norm_dtype)
    graft._sparse_only = any(child_steps.refusal(o, False, True) for o in children)
