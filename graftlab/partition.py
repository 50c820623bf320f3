"""Partitions of a model's parameters into grafting groups (the paper's Section 3.1).

A partition names every parameter tensor and assigns it to one group:

- ``"global"``: one group, named ``global``;
- ``"layer"``: one group per parameter tensor, named as ``named_parameters()`` names it;
- ``"coordinate"``: one group per element (norms are reported per tensor);
- a callable ``name -> label``: one group per distinct label, in order of first appearance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn

GRANULARITIES = ("global", "layer", "coordinate")

Granularity = Union[str, Callable[[str], str]]
Names = Union[nn.Module, Iterable[tuple[str, torch.Tensor]], None]


@dataclass(frozen=True)
class Partition:
    """Which group each parameter tensor belongs to.

    ``tensor_group[i]`` is the index in ``group_names`` of the group of the i-th parameter tensor
    (in the magnitude optimizer's order). With ``granularity == "coordinate"`` the groups are the
    tensors (``tensor_group[i] == i``) and the update is per element.
    """

    granularity: str
    param_names: tuple[str, ...]
    group_names: tuple[str, ...]
    tensor_group: tuple[int, ...]

    @property
    def elementwise(self) -> bool:
        return self.granularity == "coordinate"

    @property
    def one_tensor_per_group(self) -> bool:
        return self.granularity in ("layer", "coordinate")

    def members(self, group: str) -> list[str]:
        """Names of the parameter tensors in ``group``."""
        g = self.group_names.index(group)
        return [n for n, k in zip(self.param_names, self.tensor_group) if k == g]


def name_parameters(params: Sequence[torch.Tensor], names: Names) -> list[str]:
    """Names for ``params`` from a module or ``(name, parameter)`` pairs, matched by identity.

    Without ``names`` the tensors are called ``param.0``, ``param.1``, ... in optimizer order.
    """
    if names is None:
        return [f"param.{i}" for i in range(len(params))]
    pairs = names.named_parameters() if isinstance(names, nn.Module) else names
    by_id: dict[int, str] = {}
    for item in pairs:
        try:
            name, p = item
        except (TypeError, ValueError):
            raise ValueError("names must be an nn.Module or an iterable of (name, parameter) pairs") from None
        by_id.setdefault(id(p), str(name))
    wanted = {id(p) for p in params}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    extra = sorted(n for i, n in by_id.items() if i not in wanted)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} optimized tensor(s) have no name (positions {missing[:10]})")
        if extra:
            parts.append(f"names given for tensors the optimizers do not hold: {extra[:10]}")
        raise ValueError("names do not match the optimizers' parameters: " + "; ".join(parts))
    return [by_id[id(p)] for p in params]


def make_partition(param_names: Sequence[str], granularity: Granularity) -> Partition:
    """Build the :class:`Partition` of ``param_names`` for ``granularity``."""
    names = tuple(param_names)
    if callable(granularity):
        labels = []
        for n in names:
            label = granularity(n)
            if not isinstance(label, str) or not label:
                raise ValueError(f"granularity function returned {label!r} for {n!r}; expected a non-empty str")
            labels.append(label)
        groups = tuple(dict.fromkeys(labels))
        index = {g: i for i, g in enumerate(groups)}
        return Partition("custom", names, groups, tuple(index[label] for label in labels))
    if granularity == "global":
        return Partition("global", names, ("global",), (0,) * len(names))
    if granularity in ("layer", "coordinate"):
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique for layer or coordinate granularity")
        return Partition(granularity, names, names, tuple(range(len(names))))
    raise ValueError(
        f"unknown granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)} "
        "or a function from parameter name to group label"
    )
