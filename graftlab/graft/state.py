"""A :class:`~graftlab.Graft`'s state: its state dict (both children in torch.optim's format, the
partition and the step count) and what ``pickle``/``copy.deepcopy`` keep of it.

The Graft's ``state_dict``, ``load_state_dict`` and ``__getstate__`` call these with itself (typed
as the ``Optimizer`` it is, so that this module does not import the one that imports it); the hooks
registered on the Graft fire here as torch.optim's own methods fire them.
"""
from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from graftlab.graft import build, child_steps
from graftlab.errors import GraftlabError


def state_dict(graft: Optimizer) -> dict[str, Any]:
    """``{"magnitude": M.state_dict(), "direction": D.state_dict(), "graft": {granularity, groups, steps}}``."""
    for hook in graft._optimizer_state_dict_pre_hooks.values():
        hook(graft)
    if build.changed(graft):
        build.build(graft)
    state = {
        "magnitude": graft.magnitude.state_dict(),
        "direction": graft.direction.state_dict(),
        "graft": {
            "granularity": graft.partition.granularity, "groups": list(graft.group_names), "steps": graft._steps,
        },
    }
    for hook in graft._optimizer_state_dict_post_hooks.values():
        out = hook(graft, state)
        if out is not None:
            state = out
    return state


def load_state_dict(graft: Optimizer, state_dict: dict[str, Any]) -> None:
    """Load both children and the step count; nothing changes when the dict is refused.

    Raises:
        GraftlabError: not a Graft's state dict, saved with another partition, or a child's part
            does not fit that child (:func:`graftlab.graft.child_steps.check_child_state`).
    """
    state_dict = dict(state_dict)
    for hook in graft._optimizer_load_state_dict_pre_hooks.values():
        out = hook(graft, state_dict)
        if out is not None:
            state_dict = out
    missing = {"magnitude", "direction", "graft"} - set(state_dict)
    if missing:
        raise GraftlabError(f"not a Graft state dict: missing {sorted(missing)}")
    if build.changed(graft):
        build.build(graft)
    meta = state_dict["graft"]
    if meta.get("granularity") != graft.partition.granularity or list(meta.get("groups", [])) != list(
        graft.group_names
    ):
        raise GraftlabError("state dict was saved with a different partition (granularity or group names differ)")
    for role in ("magnitude", "direction"):
        child_steps.check_child_state(role, getattr(graft, role), state_dict[role])
    graft.magnitude.load_state_dict(state_dict["magnitude"])
    graft.direction.load_state_dict(state_dict["direction"])
    graft._steps = int(meta.get("steps", 0))
    for hook in graft._optimizer_load_state_dict_post_hooks.values():
        hook(graft)


def getstate(graft: Optimizer) -> dict[str, Any]:
    """What pickling keeps: the children, the settings, the step count and the last stats; the
    buffers are built again on unpickling."""
    gran = graft._granularity
    known = None
    if callable(gran) and not build.importable(gran):
        # pickle cannot store a lambda: keep the labels of the tensors grafted so far instead
        known = dict(zip(graft.partition.param_names, (graft.group_names[k] for k in graft.partition.tensor_group)))
        gran = None
    return {
        "magnitude": graft.magnitude, "direction": graft.direction, "_granularity": gran, "_known_labels": known,
        "_path_choice": graft._path_choice, "_split": graft._split, "_fused_choice": graft._fused_choice,
        "_slicing": getattr(graft, "_slicing", None),
        "_names": graft._names, "_step_count": graft._step_count,
        "state": graft.state,
        "_stats": graft._stats,
    }
