"""Partitions of a model's parameters into grafting groups (the paper's Section 3.1).

A partition names every parameter tensor and assigns it to one group:

- ``"global"``: one group, named ``global``;
- ``"layer"``: one group per parameter tensor, named as ``named_parameters()`` names it;
- ``"head"``: as ``"layer"``, with attention Q/K/V and output weights one group per head;
- ``"vocab"``: as ``"head"``, with the word embedding and output layer per block of vocabulary rows
  (:mod:`graftlab.graft.slicing`);
- ``"coordinate"``: one group per element (norms are reported per tensor);
- a callable ``name -> label``: one group per distinct label, in order of first appearance.

A partition can also split a tensor into named slices along one dimension, each slice its own
unit: ``"layer"`` splits the fused layouts graftlab recognises (:func:`fused_layout`: GPT-2's
``attn.c_attn`` weight and bias hold Q, K and V side by side along the output dimension) into
groups named ``<tensor>[q]``, ``<tensor>[k]``, ``<tensor>[v]`` unless ``split=None``. The norms of a
slice are the norms of exactly its elements, so each slice is grafted as if it were its own tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from graftlab import names as wrappers
from graftlab.errors import GraftlabError
from graftlab.graft.slicing import Slicing, fused_layout, units_of, vocab_kinds

GRANULARITIES = ("global", "layer", "head", "vocab", "coordinate")
SPLITS = ("fused", None)
Slice = tuple[int, int, int]  # (dim, start, stop) of a unit inside its tensor

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
    # With split tensors the entries above are per *unit* (a slice or a whole tensor, in tensor
    # order; a slice's name is ``<tensor>[<label>]``); ``unit_tensor[u]`` is the index of unit u's
    # tensor and ``slices[u]`` its (dim, start, stop), None for a whole tensor. Empty: no split.
    unit_tensor: tuple[int, ...] = ()
    slices: tuple[Optional[Slice], ...] = ()

    @property
    def split(self) -> bool:
        return bool(self.unit_tensor)

    def units(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One tensor per unit: ``tensors`` (one per parameter) as they are, or with each split
        tensor replaced by views of its slices (no copy: writing to a view writes the tensor)."""
        if not self.unit_tensor:
            return list(tensors)
        return [tensors[t] if s is None else tensors[t].narrow(s[0], s[1], s[2] - s[1])
                for t, s in zip(self.unit_tensor, self.slices)]

    @property
    def elementwise(self) -> bool:
        return self.granularity == "coordinate"

    @property
    def one_tensor_per_group(self) -> bool:
        return self.granularity in ("layer", "head", "vocab", "coordinate")

    def members(self, group: str) -> list[str]:
        """Names of the parameter tensors in ``group``."""
        g = self.group_names.index(group)
        return [n for n, k in zip(self.param_names, self.tensor_group) if k == g]


def named_tensors(names: Names) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs from a module's ``named_parameters()`` or from pairs given as they are.

    A module is named as the model inside torch.compile / DDP / DataParallel wrappers names its
    parameters (:mod:`graftlab.names`), so a trace of a compiled model matches the plain one.
    Raises GraftlabError when ``names`` is neither.
    """
    if names is None:
        return []
    pairs = wrappers.named_parameters(names) if isinstance(names, nn.Module) else names
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
        self.generated = 0  # tensors named param.<i> for want of a name
        # pairs given as a list: tensors added later without a name are named by their position
        self.listed = names is not None and not isinstance(names, nn.Module)
        self.pairs = named_tensors(names)
        self._index()

    def _index(self) -> None:
        self._by_id: dict[int, str] = {}
        for name, p in self.pairs:
            self._by_id.setdefault(id(p), name)

    def __getstate__(self) -> dict:
        return {"auto": self.auto, "listed": self.listed, "pairs": self.pairs}

    def __setstate__(self, state: dict) -> None:
        self.generated = 0
        self.__dict__.update({"listed": False, **state})
        self._index()  # identities change in a copy

    def follow(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """Give ``new`` the name of ``old``: a tensor a training stack swapped in for it (sharded,
        moved); the group keeps its name and so its column in a trace."""
        name = self._by_id.get(id(old))
        if name is not None and id(new) not in self._by_id:
            self.pairs.append((name, new))
            self._by_id[id(new)] = name

    def add(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Name tensors not named yet (a tensor keeps the first name it gets)."""
        for name, p in pairs:
            if id(p) not in self._by_id:
                self.pairs.append((str(name), p))
                self._by_id[id(p)] = str(name)

    def names_for(self, params: Sequence[torch.Tensor], given: Optional[Mapping[int, str]] = None,
                  later: bool = False) -> list[str]:
        """Names of ``params``; ``given`` maps ``id(tensor)`` to a name for tensors not named yet
        (``param_names`` of an optimizer's groups). With ``later`` (tensors added after
        construction) and names given as a list, an unnamed tensor is named ``param.<i>`` by its
        position ``i`` among ``params``, as torch.optim's state dict numbers parameters. Raises
        GraftlabError for tensors with no name otherwise."""
        given = dict(given or {})
        missing = [i for i, p in enumerate(params) if id(p) not in self._by_id and id(p) not in given]
        if missing and later and self.listed:
            given.update((id(params[i]), f"param.{i}") for i in missing)
            missing = []
        if missing and not self.auto:
            raise GraftlabError(
                f"names do not match the optimizers' parameters: {len(missing)} optimized tensor(s) have no "
                f"name (positions {missing[:10]}); name tensors added later with (name, tensor) pairs in "
                "param_group['params']"
            )
        for i, p in enumerate(params):
            if id(p) not in self._by_id:
                self.generated += id(p) not in given
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


def _split_units(names: tuple[str, ...], shapes: Sequence[Sequence[int]]):
    """Unit names, their tensors and slices for the fused layouts among ``names``."""
    unit_names, unit_tensor, slices = [], [], []
    for i, (n, shape) in enumerate(zip(names, shapes)):
        layout = fused_layout(n, shape)
        if layout is None:
            unit_names.append(n), unit_tensor.append(i), slices.append(None)
            continue
        dim, labels = layout
        size = shape[dim] // len(labels)
        for j, label in enumerate(labels):
            unit_names.append(f"{n}[{label}]"), unit_tensor.append(i), slices.append((dim, j * size, (j + 1) * size))
    return tuple(unit_names), tuple(unit_tensor), tuple(slices)


def _sliced(names: tuple[str, ...], shapes: Sequence[Sequence[int]], granularity: str,
            slicing: Optional[Slicing]) -> Partition:
    """The head or vocab partition: every tensor's units (:func:`graftlab.graft.slicing.units_of`)."""
    from graftlab.kinds import classify

    if len(set(names)) != len(names):
        raise GraftlabError(f"parameter names must be unique for granularity={granularity!r}")
    slicing = slicing or Slicing()
    kinds = [classify(n).kind for n in names]
    vocab = None
    if granularity == "vocab":
        kinds, vocab = vocab_kinds(names, shapes, kinds, slicing)
    unit_names, unit_tensor, slices = [], [], []
    for i, (n, shape, kind) in enumerate(zip(names, shapes, kinds)):
        units = units_of(n, tuple(shape), kind, granularity, slicing, vocab)
        if units is None:
            unit_names.append(n), unit_tensor.append(i), slices.append(None)
            continue
        for label, sl in units:
            unit_names.append(f"{n}[{label}]"), unit_tensor.append(i), slices.append(sl)
    if len(unit_names) == len(names):
        raise GraftlabError(f"granularity={granularity!r} found no attention tensor to split per head "
                            "(nothing named as a Q, K, V or attention-output projection); use granularity='layer'")
    units = tuple(unit_names)
    return Partition(granularity, units, units, tuple(range(len(units))), tuple(unit_tensor), tuple(slices))


def make_partition(param_names: Sequence[str], granularity: Granularity,
                   shapes: Optional[Sequence[Sequence[int]]] = None, split: Optional[str] = None,
                   slicing: Optional[Slicing] = None) -> Partition:
    """Build the :class:`Partition` of ``param_names`` for ``granularity``.

    ``"head"`` and ``"vocab"`` need ``shapes`` and take head counts and the row block from
    ``slicing`` (:func:`graftlab.graft.slicing.slicing_for`).

    ``split="fused"`` with ``shapes`` (one per name) splits the fused layouts of
    :func:`fused_layout` into named slices at ``"layer"`` granularity (other granularities keep
    whole tensors: a global group holds every element anyway, a coordinate group one element).

    Raises GraftlabError for an unknown ``granularity`` or ``split``, a label function that
    returns something other than a non-empty str, or repeated names at layer or coordinate
    granularity.
    """
    if split not in SPLITS:
        raise GraftlabError(f"unknown split {split!r}: expected 'fused' or None")
    names = tuple(param_names)
    if granularity in ("head", "vocab"):
        if shapes is None:
            raise GraftlabError(f"granularity={granularity!r} needs the tensors' shapes")
        return _sliced(names, shapes, granularity, slicing)
    if split == "fused" and granularity == "layer" and shapes is not None:
        if len(set(names)) != len(names):
            raise GraftlabError("parameter names must be unique for granularity='layer'")
        units, unit_tensor, slices = _split_units(names, shapes)
        if len(units) != len(names):
            return Partition("layer", units, units, tuple(range(len(units))), unit_tensor, slices)
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
