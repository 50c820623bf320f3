"""Group norms of per-tensor steps: the one seam between :class:`~graftlab.Graft` and where tensors live.

Every grafted step is the same sequence (the paper's Algorithm 1): the children's steps, the
per-group norms ``||w_M - w_t||`` and ``||w_D - w_t||``, then the combination. Only the norms depend
on where the tensors live, so ``Graft`` talks to them through one interface with two implementations:

- :class:`PlainNorms` (this module): whole tensors in one process (or replicated, as under DDP);
  per-tensor norms with ``torch._foreach_norm``, summed per group with one ``index_add_``.
- :class:`graftlab.graft.shards.ShardLayout`: FSDP2 / DTensor shards; each rank sums the
  squares of its local pieces and one all-reduce of ``2 x n_groups`` values gives the whole norms.

The interface (both classes)::

    locals(tensors) -> list[Tensor]          # the pieces this process computes on
    partial(steps) -> Tensor                 # (n_groups,) what this process knows of each group (steps:
                                             # one per parameter; PlainNorms takes the units itself)
    from_squares(sq) -> (norm_m, norm_d)     # whole-tensor norms from per-tensor squares (fused path;
                                             # PlainNorms only)
    finish(part_m, part_d) -> (norm_m, norm_d)   # (n_groups,) each: the whole-group norms
    run_rule(rule, group, params, states, out, scratch)  # a graftlab.graft.rules rule on the pieces

``steps`` are real tensors (complex ones are passed as ``torch.view_as_real`` views); norms are
accumulated in ``dtype`` (float32, or float64 for float64 parameters) and stay on the device.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from graftlab.graft.units import UnitPlan


class PlainNorms:
    """Group norms of whole tensors in one process: nothing to reduce across processes."""

    def __init__(self, tensor_group: Sequence[int], n_groups: int, dtype: torch.dtype, device: torch.device,
                 plan: Optional[UnitPlan] = None):
        self.dtype = dtype
        self.n_groups = n_groups
        self.plan = plan  # split tensors: the norms are per unit (graftlab.graft.units)
        grouped = list(tensor_group) != list(range(len(tensor_group)))
        self.index = torch.tensor(list(tensor_group), device=device) if grouped else None

    @staticmethod
    def locals(tensors: Sequence[Tensor]) -> list[Tensor]:
        return list(tensors)

    def partial(self, steps: Sequence[Tensor]) -> Tensor:
        """The group norms themselves: per-tensor (per-unit) norms, combined per group as sqrt(sum of
        squares). ``steps``: one tensor per parameter."""
        if self.plan is not None:
            per_tensor = self.plan.norms(steps, self.dtype)
        else:
            per_tensor = torch.stack(torch._foreach_norm(steps, 2, dtype=self.dtype))
        if self.index is None:
            return per_tensor
        sq = torch.zeros(self.n_groups, device=per_tensor.device, dtype=self.dtype)
        return sq.index_add_(0, self.index, per_tensor * per_tensor).sqrt_()

    def from_squares(self, sq: Tensor) -> tuple[Tensor, Tensor]:
        """``(norm_m, norm_d)`` per group from ``(2, n_tensors)`` squared per-tensor norms (the fused
        path's pass 1 reduces them; :mod:`graftlab.graft.fused`)."""
        if self.index is not None:
            sq = torch.zeros((2, self.n_groups), device=sq.device, dtype=self.dtype).index_add_(1, self.index, sq)
        norms = sq.sqrt()
        return norms[0], norms[1]

    @staticmethod
    def finish(part_m: Tensor, part_d: Tensor) -> tuple[Tensor, Tensor]:
        return part_m, part_d

    @staticmethod
    def run_rule(rule: Callable, group: dict, params: list[Tensor], states: list[dict], out: list[Tensor],
                 scratch: Callable[[], list[Tensor]]) -> None:
        """Run a direct update rule (:mod:`graftlab.graft.rules`) on the whole tensors."""
        rule(group, params, [p.grad for p in params], states, out, scratch)
