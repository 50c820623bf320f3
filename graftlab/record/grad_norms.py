"""Per-group gradient norms of a Graft's parameters: the trace column ``norm_g`` the Recorder writes.

:mod:`graftlab.distill.degenerate` reads them to tell groups whose gradient is float noise (D's step then
means nothing) from large real corrections. Taken on the device, without a host sync, into a
row of the Recorder's ring buffer.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from graftlab.graft.optimizer import Graft


class GradNorms:
    """Per-group gradient norms of a Graft's parameters, taken on the device without a host sync.

    Read in the step post-hook: the gradients the step used are still there (``zero_grad`` comes
    after), including those a closure computed inside ``step``.
    """

    def __init__(self, graft: Graft, period: int) -> None:
        self.graft = graft
        self.period = max(int(period), 1)
        params = graft.params
        # DTensor shards: a norm would be a collective that the other ranks (which do not record)
        # never join.
        self.usable = all(type(p) in (torch.Tensor, nn.Parameter) for p in params)
        self.per_tensor = graft.partition.one_tensor_per_group
        self.n_groups = len(graft.group_names)
        self._index: Optional[Tensor] = None
        self._zero: Optional[Tensor] = None

    def write(self, ring: Tensor, row: int, step: int) -> None:
        """Gradient norms into ``ring[row]`` on steps that are a multiple of the period."""
        if step % self.period:
            return
        grads = [p.grad for p in self.graft.params]
        if all(g is None for g in grads):
            return
        if self._zero is None:
            self._zero = ring.new_zeros(())
        # a parameter without a gradient counts as zero; sparse gradients by their stored values
        grads = [self._zero if g is None else (g.coalesce()._values() if g.is_sparse else g) for g in grads]
        part = self.graft.partition
        plan = getattr(self.graft, "_plan", None)
        if part.split and plan is not None:  # a slice's gradient norm is that of its own elements
            if any(g.dim() == 0 and p.dim() for g, p in zip(grads, self.graft.params)):
                grads = [torch.zeros_like(p) if g.dim() == 0 and p.dim() else g for g, p in zip(grads, self.graft.params)]
            per = plan.norms(grads, ring.dtype)
        else:
            per = torch.stack(torch._foreach_norm(grads, 2, dtype=ring.dtype))
        if self.per_tensor:
            ring[row].copy_(per)
            return
        if self._index is None:
            self._index = torch.tensor(self.graft.partition.tensor_group, device=per.device)
        sq = torch.zeros(self.n_groups, dtype=ring.dtype, device=per.device)
        ring[row].copy_(sq.index_add_(0, self._index, per * per).sqrt_())


def precision_of(params: Iterable[Tensor]) -> Optional[str]:
    """The trace metadata's ``precision``: the name of the coarsest floating dtype among ``params``
    (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"float64"``), whose rounding the gradients carry;
    None without floating parameters. A run under ``torch.autocast`` computes in the autocast dtype
    while its parameters stay float32: it says so itself (``Recorder(metadata={"precision":
    "bfloat16"})``; ``graftlab record`` does it for tasks that autocast)."""
    dtypes = {p.dtype for p in params if p.dtype.is_floating_point}
    if not dtypes:
        return None
    return str(max(dtypes, key=lambda d: torch.finfo(d).eps)).removeprefix("torch.")
