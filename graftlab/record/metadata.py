"""The run metadata a :class:`~graftlab.Recorder` writes with its trace: the groups (kinds,
shapes, sizes, members), the optimizers, the recording settings and the versions."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from graftlab import trace
from graftlab.errors import GraftlabError
from graftlab.record.grad_norms import precision_of
from graftlab.graft.optimizer import Graft
from graftlab.kinds import GroupKind, Overrides, _as_kind, _owners, classify_names, group_kind, to_dict
from graftlab.graft.optimizers import describe
from graftlab.trace.portable import portable_paths

# set by the recorder from the Graft: a user's metadata may not replace them
RESERVED = frozenset({"format", "groups", "granularity"})


def versions() -> dict[str, str]:
    from graftlab.version import VERSION

    return {"graftlab": VERSION, "torch": torch.__version__}


def group_kinds(graft: Graft, model: Optional[nn.Module], kinds: Overrides) -> list[GroupKind]:
    """The kind of each of ``graft``'s groups (:mod:`graftlab.kinds`), from parameter names, the
    module types of ``model`` when given, and the ``kinds`` overrides."""
    part = graft.partition
    modules: dict[str, nn.Module] = {}
    if isinstance(model, nn.Module):
        modules = _owners(model)
    per_param = classify_names(part.param_names, kinds, modules)
    out = []
    for gi, name in enumerate(part.group_names):
        members = [per_param[n] for n, k in zip(part.param_names, part.tensor_group) if k == gi]
        kind = group_kind(members)
        if isinstance(kinds, Mapping) and name in kinds and name not in per_param:
            kind = _as_kind(kinds[name], kind)  # a custom or global group named in the overrides
        out.append(kind)
    return out


def groups_meta(graft: Graft, kinds: list[GroupKind]) -> list[dict[str, Any]]:
    """The metadata's ``groups``: per group its name, kind, shape (one tensor only), numel, members."""
    part = graft.partition
    params = part.units(graft.params)  # slices of split tensors are groups of their own
    groups = []
    for gi, (name, kind) in enumerate(zip(part.group_names, kinds)):
        idx = [i for i, k in enumerate(part.tensor_group) if k == gi]
        numel = int(sum(params[i].numel() for i in idx))
        shape = list(params[idx[0]].shape) if len(idx) == 1 else None
        groups.append(
            {"name": name, **to_dict(kind), "shape": shape, "numel": numel,
             "members": [part.param_names[i] for i in idx]}
        )
    return groups


def run_metadata(graft: Graft, kinds: list[GroupKind], user: Mapping[str, Any], path: Path, *, every: int,
                 flush_every: int, start_step: int) -> dict[str, Any]:
    """The defaults merged under ``user``'s keys, with paths made relative to the trace ``path``.

    Raises GraftlabError when ``user`` sets a key the recorder owns (``format``, ``groups``,
    ``granularity``).
    """
    meta: dict[str, Any] = {
        "format": trace.FORMAT,
        "granularity": graft.partition.granularity,
        "groups": groups_meta(graft, kinds),
        "magnitude": describe(graft.magnitude),
        "direction": describe(graft.direction),
        "task": None,
        "batch_size": None,
        "seed": None,
        "device": str(graft.params[0].device),
        "precision": precision_of(graft.params),  # the gradients' rounding (graftlab.distill.degenerate)
        "every": every,
        "flush_every": flush_every,
        "start_step": start_step,
        "versions": versions(),
        "config": None,
    }
    clash = sorted(RESERVED & set(user))
    if clash:
        raise GraftlabError(f"metadata keys {', '.join(clash)} are set by the recorder")
    meta.update(user)
    # a trace travels: no absolute path of the recording machine (graftlab.trace.portable)
    return portable_paths(meta, path)
