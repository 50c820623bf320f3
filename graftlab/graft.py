"""The grafted meta-optimizer M#D (the paper's Algorithm 1).

Each step takes its size from the magnitude optimizer M and its direction from the direction
optimizer D, separately for every group of a :class:`~graftlab.partition.Partition`::

    w_{t+1} = w_t + (||w_M - w_t|| / ||w_D - w_t||) * (w_D - w_t)      per group,
    w_{t+1} = w_t                                                       where D's step is zero.

Usage (only the optimizer construction changes in a training loop)::

    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = graftlab.Graft(adam, sgd, granularity="layer", names=model)
    sched = torch.optim.lr_scheduler.LambdaLR(adam, warmup)   # M's schedule drives the step size
    ...
    loss.backward(); opt.step(); opt.zero_grad(); sched.step()

``state_dict()`` holds both children::

    >>> opt.state_dict().keys()
    dict_keys(['magnitude', 'direction', 'graft'])
    >>> opt.state_dict()["graft"]
    {'granularity': 'layer', 'groups': ['fc.weight', 'fc.bias'], 'steps': 0}

Two paths compute the children's steps. The *direct* path (SGD, Adam, AdamW, Adagrad, RMSprop as
exact classes) computes each child's step from its own state (see :mod:`graftlab.updates`), exactly,
without touching the weights. The *generic* path works for any optimizer, including another
``Graft``: it lets M step, measures, restores ``w_t``, lets D step, and rescales. Both keep one
parameter-sized buffer (two at coordinate granularity), allocated on the first step.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from graftlab import updates
from graftlab.partition import Granularity, Names, Partition, make_partition, name_parameters

PATHS = ("auto", "direct", "generic")


def _flat_params(opt: Optimizer) -> list[Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _check_children(magnitude: Any, direction: Any) -> list[Tensor]:
    for role, opt in (("magnitude", magnitude), ("direction", direction)):
        if not isinstance(opt, Optimizer):
            raise ValueError(f"{role} must be a torch.optim.Optimizer, got {type(opt).__name__}")
    if magnitude is direction:
        raise ValueError("magnitude and direction must be two optimizer instances (each keeps its own state)")
    pm, pd = _flat_params(magnitude), _flat_params(direction)
    if len({id(p) for p in pm}) != len(pm):
        raise ValueError("the magnitude optimizer holds a parameter twice")
    ids_m, ids_d = {id(p) for p in pm}, {id(p) for p in pd}
    if ids_m != ids_d:
        only_m, only_d = len(ids_m - ids_d), len(ids_d - ids_m)
        raise ValueError(
            "magnitude and direction must be built over the same parameters: "
            f"{only_m} tensor(s) only in magnitude, {only_d} only in direction"
        )
    if not pm:
        raise ValueError("the optimizers hold no parameters")
    return pm


class Graft(Optimizer):
    """M#D: step sizes from ``magnitude``, directions from ``direction``, per group.

    Args:
        magnitude: optimizer M, built over the model's parameters (attach LR schedulers here).
        direction: optimizer D, built over the same parameters.
        granularity: ``"layer"`` (default: one group per tensor), ``"global"``, ``"coordinate"``,
            or a function from parameter name to group label.
        names: an ``nn.Module`` or ``(name, parameter)`` pairs naming the tensors; groups at layer
            granularity carry these names. Without it tensors are ``param.0``, ``param.1``, ...
        path: ``"auto"`` (direct where both children allow it), ``"direct"`` or ``"generic"``.

    After each step, :attr:`last_stats` holds per-group ``[norm_m, norm_d, ratio]`` on the
    parameters' device (no host sync); :attr:`group_names` names its columns.
    """

    def __init__(
        self,
        magnitude: Optimizer,
        direction: Optimizer,
        *,
        granularity: Granularity = "layer",
        names: Names = None,
        path: str = "auto",
    ) -> None:
        params = _check_children(magnitude, direction)
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}: expected one of {', '.join(PATHS)}")
        self.magnitude = magnitude
        self.direction = direction
        self.partition: Partition = make_partition(name_parameters(params, names), granularity)
        rules = (updates.rule_for(magnitude), updates.rule_for(direction))
        if path == "direct" and None in rules:
            bad = [type(o).__name__ for o, r in zip((magnitude, direction), rules) if r is None]
            raise ValueError(
                f"no direct path for {', '.join(bad)}: direct supports "
                f"{', '.join(c.__name__ for c in updates.RULES)} without fused/capturable/differentiable"
            )
        self._rules = rules if (path != "generic" and None not in rules) else None
        self._steps = 0
        self._buf: Optional[list[Tensor]] = None
        self._abs_m: Optional[list[Tensor]] = None
        self._scratch: Optional[list[Tensor]] = None
        self._stats: Optional[Tensor] = None
        self._layout = None  # a graftlab.distributed.ShardLayout when parameters are DTensors
        super().__init__([{"params": params}], defaults={})
        self._slot = {id(p): i for i, p in enumerate(params)}

    # -- public read-only views ------------------------------------------------------------
    @property
    def path(self) -> str:
        """``"direct"`` or ``"generic"``: which path :meth:`step` takes."""
        return "generic" if self._rules is None else "direct"

    @property
    def group_names(self) -> tuple[str, ...]:
        return self.partition.group_names

    @property
    def params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    @property
    def steps(self) -> int:
        """Number of grafted steps taken (restored by :meth:`load_state_dict`)."""
        return self._steps

    @property
    def last_stats(self) -> Tensor:
        """``(3, n_groups)`` tensor: rows ``norm_m``, ``norm_d``, ``ratio`` of the last step.

        The same tensor is updated in place every step; it lives on the parameters' device and is
        float32 (float64 for float64 parameters). ``ratio`` is ``norm_m / norm_d`` (not finite where
        D's step was zero; the weights are then kept). Before the first step it is all NaN.
        """
        self._ensure_buffers()
        return self._stats

    # -- optimizer protocol ----------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "param_groups", None):
            raise ValueError("Graft holds its children's parameters; add the group to both children instead")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One grafted step. A ``closure`` is evaluated once, before the children step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_buffers()
        if self._layout is not None:
            self._step_sharded()
        elif self._rules is None:
            self._step_generic()
        else:
            self._step_direct()
        self._steps += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "magnitude": self.magnitude.state_dict(),
            "direction": self.direction.state_dict(),
            "graft": {
                "granularity": self.partition.granularity,
                "groups": list(self.group_names),
                "steps": self._steps,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"magnitude", "direction", "graft"} - set(state_dict)
        if missing:
            raise ValueError(f"not a Graft state dict: missing {sorted(missing)}")
        meta = state_dict["graft"]
        if meta.get("granularity") != self.partition.granularity or list(meta.get("groups", [])) != list(
            self.group_names
        ):
            raise ValueError("state dict was saved with a different partition (granularity or group names differ)")
        self.magnitude.load_state_dict(state_dict["magnitude"])
        self.direction.load_state_dict(state_dict["direction"])
        self._steps = int(meta.get("steps", 0))

    def __repr__(self) -> str:
        return (
            f"Graft({type(self.magnitude).__name__}#{type(self.direction).__name__}, "
            f"granularity={self.partition.granularity!r}, groups={len(self.group_names)}, path={self.path!r})"
        )

    # -- internals -------------------------------------------------------------------------
    def _ensure_buffers(self) -> None:
        if self._buf is not None:
            return
        params = self.params
        self._norm_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        if not all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in params):
            from graftlab.distributed.shards import shard_layout

            self._layout = shard_layout(
                params, self.partition.tensor_group, len(self.group_names), self._norm_dtype
            )
            if self._layout is not None:  # buffers hold this rank's pieces of sharded tensors
                params = self._layout.locals(params)
        self._buf = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        if self.partition.elementwise:
            self._abs_m = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        device = params[0].device
        n_groups = len(self.group_names)
        self._stats = torch.full((3, n_groups), float("nan"), device=device, dtype=self._norm_dtype)
        self._index = torch.tensor(self.partition.tensor_group, device=device)

    def _get_scratch(self) -> list[Tensor]:
        if self._scratch is None:
            params = self.params if self._layout is None else self._layout.locals(self.params)
            self._scratch = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        return self._scratch

    def _group_norms(self, steps: list[Tensor]) -> Tensor:
        """Per-group L2 norms of per-tensor ``steps``, accumulated in float32 or wider."""
        per_tensor = torch.stack(torch._foreach_norm(steps, 2, dtype=self._norm_dtype))
        if self.partition.one_tensor_per_group:
            return per_tensor
        sq = torch.zeros(len(self.group_names), device=per_tensor.device, dtype=self._norm_dtype)
        return sq.index_add_(0, self._index, per_tensor * per_tensor).sqrt_()

    def _record(self, norm_m: Tensor, norm_d: Tensor) -> list[Tensor]:
        """Store the step's norms and return each tensor's scale factor (0 where D's step is zero)."""
        self._stats[0].copy_(norm_m)
        self._stats[1].copy_(norm_d)
        torch.div(norm_m, norm_d, out=self._stats[2])
        factor = torch.where(norm_d > 0, self._stats[2], 0.0)
        if not self.partition.one_tensor_per_group:
            factor = factor[self._index]
        return list(factor.unbind())

    def _step_generic(self) -> None:
        params, w0 = self.params, self._buf
        torch._foreach_copy_(w0, params)
        self.magnitude.step()
        torch._foreach_sub_(params, w0)  # params now hold M's step
        norm_m = self._group_norms(params)
        if self.partition.elementwise:
            torch._foreach_copy_(self._abs_m, params)
            torch._foreach_abs_(self._abs_m)
        torch._foreach_copy_(params, w0)
        self.direction.step()
        torch._foreach_sub_(params, w0)  # params now hold D's step
        norm_d = self._group_norms(params)
        factors = self._record(norm_m, norm_d)
        if self.partition.elementwise:
            # per coordinate |dM| / |dD| * dD == |dM| * sign(dD), and sign(0) == 0 keeps w_t
            torch._foreach_sign_(params)
            torch._foreach_mul_(params, self._abs_m)
        else:
            torch._foreach_mul_(params, factors)
        torch._foreach_add_(params, w0)

    def _child_step(self, opt: Optimizer, rule: Callable, out: list[Tensor], sharded: bool = False) -> None:
        """out <- the step ``opt`` would take now; advances ``opt``'s state, not the weights.

        With ``sharded`` the rule runs on each rank's local pieces (see graftlab.distributed) and the
        optimizer state stays DTensor.
        """
        slot = self._slot
        for group in opt.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if len(ps) != len(group["params"]):
                for p in group["params"]:
                    if p.grad is None:
                        out[slot[id(p)]].zero_()
            if not ps:
                continue
            idx = [slot[id(p)] for p in ps]
            states, outs = [opt.state[p] for p in ps], [out[i] for i in idx]
            scratch = lambda: [self._get_scratch()[i] for i in idx]  # noqa: E731
            if sharded:
                self._layout.run_rule(rule, group, ps, states, outs, scratch)
                continue
            if any(p.grad.is_sparse for p in ps):
                raise ValueError("sparse gradients need path='generic'")
            rule(group, ps, [p.grad for p in ps], states, outs, scratch)
        # the child's own step() did not run: tell its LR scheduler that it stepped, as step() would
        opt._opt_called = True

    def _step_direct(self) -> None:
        params, step = self.params, self._buf
        self._child_step(self.magnitude, self._rules[0], step)
        norm_m = self._group_norms(step)
        if self.partition.elementwise:
            torch._foreach_copy_(self._abs_m, step)
            torch._foreach_abs_(self._abs_m)
        self._child_step(self.direction, self._rules[1], step)
        norm_d = self._group_norms(step)
        factors = self._record(norm_m, norm_d)
        if self.partition.elementwise:
            torch._foreach_sign_(step)
            torch._foreach_addcmul_(params, step, self._abs_m)
        else:
            torch._foreach_addcmul_(params, step, factors)  # w += factor * step in one pass

    # -- sharded parameters (FSDP2 / DTensor); see graftlab.distributed -----------------------
    def _step_sharded(self) -> None:
        """Both paths with sharded parameters: foreach math on local pieces, whole-tensor norms from
        one all-reduce of the squared local norms (``2 x n_groups`` values) per step."""
        layout, buf, generic = self._layout, self._buf, self._rules is None
        params = layout.locals(self.params)  # fetched per step: FSDP may swap the local tensors
        if generic:
            torch._foreach_copy_(buf, params)
            self.magnitude.step()
            torch._foreach_sub_(params, buf)  # params now hold M's step, buf holds w_t
            step = params
        else:
            self._child_step(self.magnitude, self._rules[0], buf, sharded=True)
            step = buf
        sq_m = layout.group_sq(step)
        if self.partition.elementwise:
            torch._foreach_copy_(self._abs_m, step)
            torch._foreach_abs_(self._abs_m)
        if generic:
            torch._foreach_copy_(params, buf)
            self.direction.step()
            torch._foreach_sub_(params, buf)  # params now hold D's step
        else:
            self._child_step(self.direction, self._rules[1], buf, sharded=True)
        sq_d = layout.group_sq(step)
        factors = self._record(*layout.norms(sq_m, sq_d))
        if self.partition.elementwise:
            torch._foreach_sign_(step)
            torch._foreach_mul_(step, self._abs_m)
        else:
            torch._foreach_mul_(step, factors)
        torch._foreach_add_(params, buf)
