"""Partitions of a model's parameters into grafting groups (the paper's Section 3.1).

A partition names every parameter tensor and assigns it to one group:

- ``"global"``: one group, named ``global``;
- ``"layer"``: one group per parameter tensor, named as ``named_parameters()`` names it;
- ``"coordinate"``: one group per element (norms are reported per tensor);
- a callable ``name -> label``: one group per distinct label, in order of first appearance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from graftlab.errors import GraftlabError

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


def named_tensors(names: Names) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs from a module's ``named_parameters()`` or from pairs given as they are.

    Raises GraftlabError when ``names`` is neither.
    """
    if names is None:
        return []
    pairs = names.named_parameters() if isinstance(names, nn.Module) else names
    out = []
    try:
        for item in pairs:
            name, p = item
            out.append((str(name), p))
    except (TypeError, ValueError):
        raise GraftlabError("names must be an nn.Module or an iterable of (name, parameter) pairs") from None
    return out


class TensorNames:
    """The name of every parameter tensor a :class:`~graftlab.Graft` has seen, kept by identity.

    Names come from ``names`` (a module or pairs; tensors it names that the optimizers do not hold,
    such as frozen layers, are allowed). Without ``names`` tensors are called ``param.0``,
    ``param.1``, ... in the order they are first seen, and a tensor keeps its name when others are
    added. The object pickles and deep-copies with the tensors it names.
    """

    def __init__(self, names: Names) -> None:
        self.auto = names is None
        self.pairs = named_tensors(names)
        self._index()

    def _index(self) -> None:
        self._by_id: dict[int, str] = {}
        for name, p in self.pairs:
            self._by_id.setdefault(id(p), name)

    def __getstate__(self) -> dict:
        return {"auto": self.auto, "pairs": self.pairs}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._index()  # identities change in a copy

    def add(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Name tensors not named yet (a tensor keeps the first name it gets)."""
        for name, p in pairs:
            if id(p) not in self._by_id:
                self.pairs.append((str(name), p))
                self._by_id[id(p)] = str(name)

    def names_for(self, params: Sequence[torch.Tensor], given: Optional[Mapping[int, str]] = None) -> list[str]:
        """Names of ``params``; ``given`` maps ``id(tensor)`` to a name for tensors not named yet
        (``param_names`` of an optimizer's groups). Raises GraftlabError for tensors with no name."""
        given = given or {}
        missing = [i for i, p in enumerate(params) if id(p) not in self._by_id and id(p) not in given]
        if missing and not self.auto:
            raise GraftlabError(
                f"names do not match the optimizers' parameters: {len(missing)} optimized tensor(s) have no "
                f"name (positions {missing[:10]}); name tensors added later with (name, tensor) pairs in "
                "param_group['params']"
            )
        for i, p in enumerate(params):
            if id(p) not in self._by_id:
                name = given.get(id(p), f"param.{len(self.pairs)}")
                self.pairs.append((name, p))
                self._by_id[id(p)] = name
        return [self._by_id[id(p)] for p in params]


def name_parameters(params: Sequence[torch.Tensor], names: Names) -> list[str]:
    """Names for ``params`` from a module or ``(name, parameter)`` pairs, matched by identity.

    Without ``names`` the tensors are called ``param.0``, ``param.1``, ... in optimizer order.
    Raises GraftlabError when a tensor of ``params`` has no name.
    """
    return TensorNames(names).names_for(params)


def make_partition(param_names: Sequence[str], granularity: Granularity) -> Partition:
    """Build the :class:`Partition` of ``param_names`` for ``granularity``.

    Raises GraftlabError for an unknown ``granularity``, a label function that returns something
    other than a non-empty str, or repeated names at layer or coordinate granularity.
    """
    names = tuple(param_names)
    if callable(granularity):
        labels = []
        for n in names:
            label = granularity(n)
            if not isinstance(label, str) or not label:
                raise GraftlabError(
                    f"granularity function returned {label!r} for {n!r}; expected a non-empty str"
                )
            labels.append(label)
        groups = tuple(dict.fromkeys(labels))
        index = {g: i for i, g in enumerate(groups)}
        return Partition("custom", names, groups, tuple(index[label] for label in labels))
    if granularity == "global":
        return Partition("global", names, ("global",), (0,) * len(names))
    if granularity in ("layer", "coordinate"):
        if len(set(names)) != len(names):
            raise GraftlabError(f"parameter names must be unique for granularity={granularity!r}")
        return Partition(granularity, names, names, tuple(range(len(names))))
    raise GraftlabError(
        f"unknown granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)} "
        "or a function from parameter name to group label"
    )
