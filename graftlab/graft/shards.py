"""Sharded (FSDP2 / DTensor) parameters inside :class:`~graftlab.Graft`: local pieces, whole norms.

Under FSDP2 each rank holds a shard of every tensor as a ``DTensor``; ``Graft`` does its foreach
math on the local shards and gets the norms of the WHOLE tensors from one all-reduce per step of
the squared local norms (``2 x n_groups`` values), so the ratios are the ones a single process
would compute. :class:`ShardLayout` is the sharded side of the norm seam described in
:mod:`graftlab.graft.norms` (``locals``, ``partial``, ``finish``, ``run_rule``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor


if torch.distributed.is_available():
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
else:  # builds without distributed support: nothing here can be sharded
    dist = None
    DTensor = ()  # isinstance(x, ()) is always False
from graftlab.errors import GraftlabError


def _local(t: Tensor) -> Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


class ShardLayout:
    """How a :class:`~graftlab.Graft`'s tensors are spread over ranks, and their whole norms.

    ``Graft`` builds one when any parameter is a ``DTensor``. Every rank squares the norms of its
    local pieces, sums them per group, and one all-reduce of the stacked ``(2, n_groups)`` M and D
    sums gives every rank the squared norms of the whole groups. A tensor replicated along a mesh
    dimension (a plain tensor, or a ``Replicate`` placement) contributes only on coordinate 0 of
    that dimension, so it is counted once.
    """

    def __init__(self, params: Sequence[Tensor], tensor_group: Sequence[int], n_groups: int, dtype: torch.dtype):
        meshes: list = []
        for p in params:  # equal meshes may be distinct objects (one per fully_shard call)
            if isinstance(p, DTensor) and not any(p.device_mesh == m for m in meshes):
                meshes.append(p.device_mesh)
        if len(meshes) != 1:
            raise GraftlabError("all sharded parameters of one Graft must live on one device mesh")
        mesh = meshes[0]
        coords = mesh.get_coordinate()
        if coords is None:
            raise GraftlabError("this rank is not part of the parameters' device mesh")
        if mesh.ndim == 1:
            self.group = mesh.get_group()
        elif mesh.size() == dist.get_world_size():
            self.group = None  # the whole world is the mesh
        else:
            raise GraftlabError("a multi-dimensional device mesh must span all ranks")
        own = []
        for p in params:
            if isinstance(p, DTensor):
                if any(pl.is_partial() for pl in p.placements):
                    raise GraftlabError("a parameter with a Partial placement cannot be grafted")
                own.append(all(c == 0 or pl.is_shard() for c, pl in zip(coords, p.placements)))
            else:
                own.append(all(c == 0 for c in coords))
        device = _local(params[0]).device
        self.mesh = mesh
        self.dtype = dtype
        self.n_groups = n_groups
        self.grouped = list(tensor_group) != list(range(len(params)))
        self.index = torch.tensor(list(tensor_group), device=device)
        self.mask = None if all(own) else torch.tensor(own, dtype=dtype, device=device)

    @staticmethod
    def locals(tensors: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor's local piece (the tensor itself when it is not a DTensor); in-place ops on
        a piece update the DTensor."""
        return [_local(t) for t in tensors]

    def partial(self, steps: Sequence[Tensor]) -> Tensor:
        """Per-group sums of this rank's squared local norms of ``steps`` (local tensors)."""
        per = torch.stack(torch._foreach_norm(steps, 2, dtype=self.dtype))
        per = per * per
        if self.mask is not None:
            per.mul_(self.mask)
        if not self.grouped:
            return per
        sq = torch.zeros(self.n_groups, device=per.device, dtype=self.dtype)
        return sq.index_add_(0, self.index, per)

    def finish(self, sq_m: Tensor, sq_d: Tensor) -> tuple[Tensor, Tensor]:
        """Whole-group norms of M's and D's steps: ONE all-reduce of ``2 x n_groups`` values."""
        both = torch.stack((sq_m, sq_d))
        dist.all_reduce(both, group=self.group)
        both.sqrt_()
        return both[0], both[1]

    def run_rule(
        self,
        rule: Callable,
        group: dict,
        params: list[Tensor],
        states: list[dict],
        out: list[Tensor],
        scratch: Callable[[], list[Tensor]],
    ) -> None:
        """Run a direct update rule (:mod:`graftlab.graft.rules`) on local pieces.

        The rule sees local parameters, gradients and state; state it creates is stored back as
        DTensors placed like their parameter, as ``torch.optim`` keeps it, so state dicts (and
        ``torch.distributed.checkpoint``) see the same thing on the direct and generic paths.
        """
        local_states = [{k: _local(v) if isinstance(v, Tensor) else v for k, v in s.items()} for s in states]
        rule(group, self.locals(params), self.locals([p.grad for p in params]), local_states, out, scratch)
        for p, s, ls in zip(params, states, local_states):
            for k, v in ls.items():
                old = s.get(k)
                if v is old or (isinstance(old, DTensor) and old._local_tensor is v):
                    continue  # updated in place
                if isinstance(p, DTensor) and isinstance(v, Tensor) and k != "step":
                    v = DTensor.from_local(
                        v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                    )
                s[k] = v


def shard_layout(params: Sequence[Tensor], tensor_group: Sequence[int], n_groups: int, dtype: torch.dtype):
    """A :class:`ShardLayout` when any of ``params`` is a DTensor, else None (the plain path)."""
    if dist is None or not any(isinstance(p, DTensor) for p in params):
        return None
    return ShardLayout(params, tensor_group, n_groups, dtype)


def step_communication(graft: Any) -> dict[str, Any]:
    """What one ``graft.step()`` sends between ranks, on top of the model's own collectives.

    >>> step_communication(opt)
    {'collectives': 1, 'op': 'all_reduce', 'numel': 24, 'bytes': 96, 'dtype': 'torch.float32'}

    Replicated parameters (DDP or one process) need nothing: ``collectives`` is 0.
    """
    layout = getattr(graft, "_layout", None)
    if layout is None:
        return {"collectives": 0, "op": None, "numel": 0, "bytes": 0, "dtype": None}
    numel = 2 * layout.n_groups
    size = torch.empty((), dtype=layout.dtype).element_size()
    return {"collectives": 1, "op": "all_reduce", "numel": numel, "bytes": numel * size, "dtype": str(layout.dtype)}


