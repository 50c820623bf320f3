"""Per-unit norms and scaled writes for split partitions, without one kernel per head or row.

A split partition (:class:`graftlab.graft.partition.Partition` with slices) has one unit per group:
a whole tensor or a slice ``(dim, start, stop)`` of one. A vocabulary at one row per group is
thousands of units; narrow views through ``torch._foreach_*`` would cost one small kernel each
(about 7 us per row on a CPU: 30 ms per step for a 2000-row output layer). Heads and row blocks
are consecutive equal slices along one dimension, so a :class:`UnitPlan` merges each such run into
one view ``unflatten(dim, (n_blocks, block))``: its norms are one reduction over the other
dimensions and its scaled write one broadcast ``addcmul_``. Whatever is left (whole tensors, Q/K/V
thirds, a shorter last row block) goes through ``torch._foreach_*`` as before.

The results are exactly those of the units one by one (the same elements, reduced in float32 or
float64 as ``torch._foreach_norm`` does).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

Slice = tuple[int, int, int]
_MIN_RUN = 4  # shorter runs (Q/K/V thirds) stay foreach views: a reduction per run costs more


class UnitPlan:
    """How the units ``zip(unit_tensor, slices)`` are computed on (see the module docstring).

    ``singles``: ``(unit, tensor, slice)`` of units computed one by one; ``runs``: ``(first unit,
    tensor, dim, start, n_blocks, block)`` of merged runs. ``order`` puts the norms (singles first,
    then each run's) back in unit order.
    """

    def __init__(self, unit_tensor: Sequence[int], slices: Sequence[Optional[Slice]], device: torch.device):
        self.n = len(unit_tensor)
        self.singles: list[tuple[int, int, Optional[Slice]]] = []
        self.runs: list[tuple[int, int, int, int, int, int]] = []
        u = 0
        while u < self.n:
            t, sl = unit_tensor[u], slices[u]
            v = u + 1
            if sl is not None:
                size = sl[2] - sl[1]
                while (v < self.n and unit_tensor[v] == t and slices[v] is not None and slices[v][0] == sl[0]
                       and slices[v][1] == slices[v - 1][2] and slices[v][2] - slices[v][1] == size):
                    v += 1
            if v - u >= _MIN_RUN:
                self.runs.append((u, t, sl[0], sl[1], v - u, sl[2] - sl[1]))
            else:
                self.singles.extend((w, unit_tensor[w], slices[w]) for w in range(u, v))
            u = v
        position = [0] * self.n
        for k, (w, _, _) in enumerate(self.singles):
            position[w] = k
        k = len(self.singles)
        for first, _, _, _, nb, _ in self.runs:
            for j in range(nb):
                position[first + j] = k + j
            k += nb
        self.order = torch.tensor(position, device=device) if self.runs else None

    @property
    def merged(self) -> bool:
        """Whether any run is merged (else the units are computed one by one, as before)."""
        return bool(self.runs)

    @staticmethod
    def _view(t: Tensor, sl: Optional[Slice]) -> Tensor:
        return t if sl is None or t.dim() == 0 else t.narrow(sl[0], sl[1], sl[2] - sl[1])

    def _blocks(self, t: Tensor, dim: int, start: int, nb: int, block: int) -> Tensor:
        return t.narrow(dim, start, nb * block).unflatten(dim, (nb, block))

    def units(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """One view per unit, in unit order."""
        out: list[Optional[Tensor]] = [None] * self.n
        for w, t, sl in self.singles:
            out[w] = self._view(tensors[t], sl)
        for first, t, dim, start, nb, block in self.runs:
            for j in range(nb):
                out[first + j] = tensors[t].narrow(dim, start + j * block, block)
        return out  # type: ignore[return-value]

    def norms(self, tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """``(n_units,)`` L2 norms of every unit of ``tensors`` (one tensor per parameter), in ``dtype``."""
        parts = []
        if self.singles:
            views = [self._view(tensors[t], sl) for _, t, sl in self.singles]
            parts.append(torch.stack(torch._foreach_norm(views, 2, dtype=dtype)))
        for _, t, dim, start, nb, block in self.runs:
            x = self._blocks(tensors[t], dim, start, nb, block)
            other = [d for d in range(x.dim()) if d != dim]
            parts.append(torch.linalg.vector_norm(x, 2, dim=other, dtype=dtype))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out if self.order is None else out[self.order]

    def _factor(self, factors: Tensor, first: int, nb: int, dim: int, ndim: int) -> Tensor:
        shape = [1] * (ndim + 1)
        shape[dim] = nb
        return factors[first : first + nb].view(shape)

    def addcmul_(self, params: Sequence[Tensor], steps: Sequence[Tensor], factors: Tensor) -> None:
        """``params[unit] += factors[unit] * steps[unit]`` for every unit (``factors``: ``(n_units,)``)."""
        if self.singles:
            f = factors[[w for w, _, _ in self.singles]] if self.runs else factors
            torch._foreach_addcmul_([self._view(params[t], sl) for _, t, sl in self.singles],
                                    [self._view(steps[t], sl) for _, t, sl in self.singles], list(f.unbind()))
        for first, t, dim, start, nb, block in self.runs:
            p = self._blocks(params[t], dim, start, nb, block)
            p.addcmul_(self._blocks(steps[t], dim, start, nb, block),
                       self._factor(factors, first, nb, dim, params[t].dim()).to(p.dtype))

    def mul_(self, steps: Sequence[Tensor], factors: Tensor) -> None:
        """``steps[unit] *= factors[unit]`` for every unit."""
        if self.singles:
            f = factors[[w for w, _, _ in self.singles]] if self.runs else factors
            torch._foreach_mul_([self._view(steps[t], sl) for _, t, sl in self.singles], list(f.unbind()))
        for first, t, dim, start, nb, block in self.runs:
            s = self._blocks(steps[t], dim, start, nb, block)
            s.mul_(self._factor(factors, first, nb, dim, steps[t].dim()).to(s.dtype))
