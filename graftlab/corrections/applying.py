"""Applying a corrections file to a model: per-parameter learning rates and ``LambdaLR`` factors."""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from graftlab.corrections.files import GLOBAL, Corrections, load_corrections
from graftlab.corrections.slices import SliceSchedule, head_counts, slice_of
from graftlab.errors import GraftlabError
from graftlab.graft.schedules import Piecewise, Product
from graftlab.kinds import whole_name


@dataclass
class Applied:
    """A corrections file turned into optimizer settings for one model.

    - ``param_groups``: one torch param-group dict per parameter, ``{"params": [p], "lr":
      base_lr * multiplier, "name": name, "factor": multiplier}``, in ``named_params`` order; pass
      it to the optimizer.
    - ``lr_factor``: the global schedule (``step -> factor``), or None without one (and None with
      per-group schedules: use :meth:`scheduler`, which covers every case).
    - ``group_lr_factors``: with per-group schedules, one ``step -> factor`` per param group (the
      global factor included), else None. A LambdaLR over the optimizer must use this list.

    In a training loop, the same three lines for static factors and schedules::

        applied = graftlab.apply_corrections(corr, model, base_lr=0.1)
        opt = torch.optim.SGD(applied.param_groups, lr=0.1)
        scheduler = applied.scheduler(opt)        # scheduler.step() after each opt.step()
    - ``missing``: model parameters the file had no factor for (factor 1; only with allow_missing).
    - ``unknown``: file groups that matched no parameter (ignored; only with allow_missing).

    Slices: a group named ``<tensor>[<slice>]`` is a slice of a tensor (GPT-2's ``c_attn`` Q/K/V
    thirds, ``[head 3]``, ``[q head 3]``, ``[rows 0-99]``: :mod:`graftlab.corrections.slices`). One
    tensor has one learning rate in torch.optim, so its param group also holds ``lr_scale``, a
    tensor broadcastable to the parameter holding each slice's factor, and with per-slice schedules
    ``lr_scale_schedule``, which sets ``lr_scale`` for each step; :meth:`register` makes an
    optimizer scale each step of that tensor by it, which is the same as scaling the slice's lr
    for every torch.optim optimizer (their steps are proportional to lr).
    """

    param_groups: list[dict[str, Any]]
    lr_factor: Optional[Callable[[int], float]] = None
    group_lr_factors: Optional[list[Callable[[int], float]]] = None
    missing: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def lr_lambda(self, run_schedule: Optional[Callable[[int], float]] = None):
        """What to give ``torch.optim.lr_scheduler.LambdaLR``: the corrections' schedule composed
        (multiplied) with the run's own ``step -> factor`` schedule. A single callable unless the
        file has per-group schedules, then a list with one callable per param group."""
        if self.group_lr_factors is not None:
            return [Product(f, run_schedule) for f in self.group_lr_factors]
        return Product(self.lr_factor, run_schedule)

    def factor_at(self, step: int) -> list[float]:
        """Each param group's total factor on ``base_lr`` at ``step`` (multiplier x schedule)."""
        base = [g["factor"] for g in self.param_groups]
        if self.group_lr_factors is not None:
            return [b * f(step) for b, f in zip(base, self.group_lr_factors)]
        s = self.lr_factor(step) if self.lr_factor is not None else 1.0
        return [b * s for b in base]

    def scheduler(self, optimizer: Any, run_schedule: Optional[Callable[[int], float]] = None) -> Any:
        """The one way to put these corrections on ``optimizer`` (built over :attr:`param_groups`),
        whatever the file holds: a ``torch.optim.lr_scheduler.LambdaLR`` whose factor at step ``t``
        is the file's schedule (global or per group; 1.0 for a file of static multipliers only)
        times ``run_schedule(t)`` (the run's own warmup/decay, or None), and the per-slice
        ``lr_scale`` hooks of :meth:`register` when a tensor has per-slice factors. Call ``scheduler.step()`` after each ``optimizer.step()``,
        as for any torch scheduler: the factor at step ``t`` applies to update ``t``.

        Raises :class:`~graftlab.errors.GraftlabError` when ``optimizer`` does not hold one param
        group per entry of :attr:`param_groups` (an optimizer built over ``model.parameters()``
        instead of ``applied.param_groups`` would silently get none of the static factors).
        """
        import torch

        groups = getattr(optimizer, "param_groups", None)
        if groups is None:
            raise GraftlabError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        ours = [g["params"][0] for g in self.param_groups]
        theirs = [g["params"][0] if len(g["params"]) == 1 else None for g in groups]
        if len(groups) != len(ours) or any(a is not b for a, b in zip(ours, theirs)):
            raise GraftlabError(
                f"the optimizer has {len(groups)} param group(s), not the {len(ours)} of applied.param_groups: "
                "build it over them, e.g. torch.optim.SGD(applied.param_groups, lr=base_lr)"
            )
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda(run_schedule))
        # the hooks live on the optimizer (not on the scheduler, whose state_dict would save them)
        self.register(optimizer)
        return sched

    def register(self, optimizer: Any, start_step: int = 0) -> "_ScaleHooks":
        """Make ``optimizer`` (built over ``param_groups``) apply the per-slice ``lr_scale``s: its
        step on such a tensor becomes ``lr_scale * step``, measured as ``w_{t+1} - w_t`` (in
        float32 that difference carries the rounding of ``w``, multiplied by the factor). One
        buffer per scaled tensor is allocated here; a step allocates nothing. Returns a handle with ``remove()``; a no-op
        handle when no group has ``lr_scale``."""
        return register_scales(optimizer, start_step)


def register_scales(optimizer: Any, start_step: int = 0) -> "_ScaleHooks":
    """What :meth:`Applied.register` does, for any optimizer whose param groups carry ``lr_scale``
    (and ``lr_scale_schedule``: per-slice schedules, followed from optimizer step ``start_step``:
    a resumed run's first step)."""
    scaled = [(g["params"][0], g["lr_scale"]) for g in optimizer.param_groups if g.get("lr_scale") is not None]
    schedules = [g["lr_scale_schedule"] for g in optimizer.param_groups if g.get("lr_scale_schedule") is not None]
    return _ScaleHooks(optimizer, scaled, schedules, start_step)


class _ScaleHooks:
    """Step hooks: ``w_t`` saved before the step, ``w_t + scale * (w_{t+1} - w_t)`` after it."""

    def __init__(self, optimizer: Any, scaled: list, schedules: Sequence[SliceSchedule] = (), start_step: int = 0) -> None:
        import torch

        self.schedules = list(schedules)
        self.step = int(start_step)  # the optimizer steps taken: the schedules' clock (host-side)
        self.params = [p for p, _ in scaled]
        self.scales = [s for _, s in scaled]
        self.saved = [torch.empty_like(p) for p in self.params]
        self.handles = []
        if scaled:
            self.handles = [optimizer.register_step_pre_hook(self._before),
                            optimizer.register_step_post_hook(self._after)]

    def _before(self, *_: Any) -> None:
        import torch

        with torch.no_grad():
            for sched in self.schedules:
                sched.at(self.step)
            torch._foreach_copy_(self.saved, self.params)

    def _after(self, *_: Any) -> None:
        import torch

        with torch.no_grad():
            torch._foreach_sub_(self.params, self.saved)
            torch._foreach_mul_(self.params, self.scales)
            torch._foreach_add_(self.params, self.saved)
        self.step += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _listing(names: Sequence[str], limit: int = 5) -> str:
    head = ", ".join(names[:limit])
    return head + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _unmatched(unknown: list[str], names: list[str], groups: Sequence[str]) -> str:
    """Why file groups ``unknown`` match none of the parameter ``names``, and the fix."""
    head = f"{len(unknown)} of {len(groups)} group(s) in the corrections match no parameter of this model"
    if unknown and all(re.fullmatch(r"param\.\d+", g) for g in unknown):
        return (f"{head} ({_listing(unknown)}): the trace was recorded by a Graft built without names=, "
                "so its groups are param.0, param.1, ... and carry no layer names; record again with "
                "Graft(..., names=model)")
    misfit = [g for g in unknown if whole_name(g) != g and whole_name(g) in names]
    if misfit:  # the tensor is there, the slice is not: rows past its end, a reversed range, other heads
        return (f"{head}: {_listing(misfit)} name slices their tensors do not have (rows past the end, a "
                "reversed range, or heads the tensor was not split into); check them against the model's shapes")
    ours, theirs = _prefix(unknown, names), _prefix(names, unknown)
    if ours:  # the model's names carry a wrapper prefix the recorded model did not have
        return (f"{head}: the model's names start with {ours!r} and the file's do not ({unknown[0]!r} is "
                f"{ours + unknown[0]!r} here); pass the inner module (model.{ours.rstrip('.')}) or "
                f"[(n.removeprefix({ours!r}), p) for n, p in model.named_parameters()]")
    if theirs:  # the recorded model was wrapped, this one is not
        return (f"{head}: the file's names start with {theirs!r} and the model's do not; pass "
                f"[({theirs!r} + n, p) for n, p in model.named_parameters()]")
    return (f"{head} (a file from another model?): {_listing(unknown)}; pass {{allow_missing=True}} to apply "
            "the groups that do match")


def _uncovered(slices: dict[str, tuple], names: list[str], params: Optional[list[Any]]) -> dict[str, str]:
    """Per sliced parameter, the rows (columns) none of its slices covers, said as ranges.
    Raises GraftlabError where two slices overlap: a row would get two factors."""
    along: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
    for g, (i, dim, start, stop) in slices.items():
        along.setdefault((i, dim), []).append((start, stop, g))
    out = {}
    for (i, dim), parts in along.items():
        parts.sort()
        end, last, holes = 0, None, []
        for start, stop, g in parts:
            if start < end:
                raise GraftlabError(f"the corrections give {names[i]} two factors where the slices {last!r} and "
                                    f"{g!r} overlap; give each row (or head) one group")
            if start > end:
                holes.append((end, start))
            end, last = stop, g
        size = params[i].shape[dim] if params is not None else end
        if end < size:
            holes.append((end, size))
        if holes:
            unit = "rows" if dim == 0 else "columns"
            out[names[i]] = f"{unit} " + ", ".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in holes)
    return out


def _prefix(short: Sequence[str], long: Sequence[str]) -> str:
    """The prefix that, put before names in ``short``, gives names in ``long`` for most of them
    (``"net."`` for a model wrapped in a parent module), or "" when none does for half of them."""
    from collections import Counter

    ends = {}
    for n in long:
        parts = n.split(".")
        for k in range(1, len(parts)):
            ends.setdefault(".".join(parts[k:]), []).append(".".join(parts[:k]) + ".")
    counts = Counter(p for g in short for p in set(ends.get(g, ())))
    if not counts:
        return ""
    prefix, n = counts.most_common(1)[0]
    return prefix if n * 2 >= len(short) else ""


def _named(named_params: Any) -> tuple[list[str], list[Any]]:
    """Names and parameters of ``(name, parameter)`` pairs, with a clear error for anything else
    (``model.parameters()`` instead of ``model.named_parameters()`` is the usual mistake)."""
    names, params = [], []
    for i, item in enumerate(named_params):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise GraftlabError(
                f"named_params must be (name, parameter) pairs, as model.named_parameters() gives; item {i} "
                f"is a {type(item).__name__}"
            )
        names.append(item[0])
        params.append(item[1])
    if len(set(names)) != len(names):
        raise GraftlabError("parameter names must be unique to apply corrections")
    return names, params


_PARALLEL = "module."  # DistributedDataParallel's and DataParallel's prefix


def _own_names(named_params: Any) -> Any:
    """Pairs named as the model inside its torch.compile (``_orig_mod.``) and, for a module given
    whole, DDP/DataParallel wrappers names them (:mod:`graftlab.names`): traces carry those names."""
    if callable(getattr(named_params, "named_parameters", None)):
        from graftlab import names as wrappers

        return wrappers.named_parameters(named_params)
    out = []
    for item in named_params:
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and "_orig_mod" in item[0]:
            item = (".".join(p for p in item[0].split(".") if p != "_orig_mod"), item[1])
        out.append(item)
    return out


def _targets(corrections: Corrections, names: list[str], params: Optional[list[Any]] = None) -> dict[str, list[int]]:
    """Each file group's parameter positions: ``global`` (unless a parameter has that name) covers
    all, a parameter's own name covers it, a custom group covers its recorded members, a slice
    ``<name>[<label>]`` its fused parameter."""
    index = {n: i for i, n in enumerate(names)}
    heads = head_counts(corrections.groups)
    members = {g: r["members"] for g, r in corrections.group_sources.records.items()
               if r.get("members") and r["members"] != [g]}
    out = {}
    for g in corrections.groups:
        if g == GLOBAL and GLOBAL not in index:
            out[g] = list(range(len(names)))
        elif g in index:
            out[g] = [index[g]]
        elif params is not None and (sl := slice_of(g, names, params, heads)) is not None:
            out[g] = [sl[0]]
        else:
            out[g] = [index[m] for m in members.get(g, []) if m in index]
    return out


def _schedules(corrections: Corrections, targets: dict[str, list[int]], n: int, global_group: bool, skip=()):
    """The global schedule (or None) and each parameter's list of per-group schedules (groups in
    ``skip``, slices, are scheduled through ``lr_scale_schedule``)."""
    overall: Optional[Piecewise] = None
    per_param: list[list[Piecewise]] = [[] for _ in range(n)]
    for g, pieces in corrections.schedule.items():
        if g in skip:
            continue
        if g == GLOBAL and global_group:
            overall = Piecewise(pieces)
            continue
        sched = Piecewise(pieces)
        for i in targets[g]:
            per_param[i].append(sched)
    return overall, per_param


def apply(
    corrections: Union[Corrections, str, os.PathLike],
    named_params: Iterable[tuple[str, Any]],
    base_lr: float,
    *,
    allow_missing: bool = False,
) -> Applied:
    """Turn ``corrections`` (a :class:`Corrections`, or the path of a corrections file) into
    per-parameter learning rates and schedules for a plain optimizer.

    This is the paper's offline transfer (Section 5): D trained alone with the per-layer factors
    distilled from M#D (Table 5 medians, or their D_beta rounding of Table 6b) or a global schedule
    (Figure 4). ``named_params`` is ``list(model.named_parameters())`` (``(name, tensor)`` pairs)
    or the model itself; a compiled model's ``_orig_mod.`` segments are dropped, and so is a
    DDP/DataParallel ``module.`` prefix (of a model given whole, or of pairs that all carry it and
    match the file only without it), since traces name the groups as the unwrapped model does;
    ``base_lr`` is D's learning rate, normally the one the trace was recorded with
    (``corrections.direction_lr``), since the factors are relative to it.

    Static multipliers become per-parameter lrs ``base_lr * factor``; a ``global`` multiplier
    applies to every parameter, and factors of several matching groups multiply. Group names are
    matched to parameter names (layer traces) or through the ``members`` recorded in
    ``source["groups"]`` (custom partitions). Returns an :class:`Applied` with one param group per
    parameter and, for schedules, the ``step -> factor`` callables for a ``LambdaLR``.

    Raises :class:`~graftlab.errors.GraftlabError` when ``base_lr`` is not positive and finite,
    ``named_params`` are not unique ``(name, parameter)`` pairs, file groups match no parameter (a
    file from another model) or parameters have no factor; the last two are allowed with
    ``allow_missing=True`` (uncovered parameters keep factor 1 and are listed in ``Applied.missing``,
    unmatched groups in ``Applied.unknown``, and a ``UserWarning`` gives both counts). A
    mismatch that a name prefix explains (a model wrapped in a parent module, ``net.``; a trace
    recorded without ``names=``, ``param.0``) says so and how to fix it.
    """
    if isinstance(corrections, (str, os.PathLike)):
        corrections = load_corrections(corrections)
    elif not isinstance(corrections, Corrections):
        raise GraftlabError(f"corrections must be a Corrections or the path of a corrections file, got "
                            f"{type(corrections).__name__}", param="corrections")
    else:  # built in Python: the checks a file gets when loaded (a NaN factor would make the weights NaN)
        corrections.validate()
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not math.isfinite(base_lr) or base_lr <= 0:
        raise GraftlabError(f"base learning rate must be positive and finite, got {base_lr!r}")
    names, params = _named(_own_names(named_params))
    targets = _targets(corrections, names, params)
    unknown = [g for g in corrections.groups if not targets[g]]
    if unknown and names and all(n.startswith(_PARALLEL) for n in names):
        # pairs of a DDP/DataParallel model (the wrapper is not at hand to say so): its own names
        # are taken only when they match every group the wrapped ones do not
        inner = [n[len(_PARALLEL):] for n in names]
        inner_targets = _targets(corrections, inner, params)
        if all(inner_targets[g] for g in corrections.groups):
            names, targets, unknown = inner, inner_targets, []
    if unknown and not allow_missing:
        raise GraftlabError(_unmatched(unknown, names, corrections.groups), param="allow_missing")
    if unknown and len(unknown) == len(corrections.groups):  # allow_missing keeps some, never all, at factor 1
        said = _unmatched(unknown, names, corrections.groups).split("; pass {allow_missing=True}")[0]
        raise GraftlabError(f"{said}; nothing in the file applies to this model, so a run with it would be a "
                            f"plain one ({{allow_missing=True}} applies the groups that match, when some do)",
                            param="allow_missing")
    heads = head_counts(corrections.groups)
    slices = {g: slice_of(g, names, params, heads) for g in corrections.groups if g not in names}
    slices = {g: v for g, v in slices.items() if v is not None and targets[g]}
    covered = {i for g in corrections.groups for i in targets[g]}
    missing = [n for i, n in enumerate(names) if i not in covered]
    if missing and not allow_missing:
        raise GraftlabError(
            f"{len(missing)} model parameter(s) have no correction in the file: {_listing(missing)}; "
            "pass {allow_missing=True} to keep factor 1 for them", param="allow_missing")

    if missing or unknown:
        warnings.warn(
            f"corrections: {len(missing)} of {len(names)} parameter tensors have no factor and keep factor 1; "
            f"{len(unknown)} of {len(corrections.groups)} file group(s) match no parameter",
            stacklevel=2,
        )

    # rows no slice covers keep the tensor's own factor: missing only where the file gives it none
    whole = {i for g in corrections.groups if g not in slices for i in targets[g]}
    uncovered = _uncovered({g: v for g, v in slices.items() if v[0] not in whole}, names, params)
    if uncovered:
        said = "; ".join(f"{n} {holes}" for n, holes in list(uncovered.items())[:3]) + (
            f"; ... ({len(uncovered)} in all)" if len(uncovered) > 3 else "")
        if not allow_missing:
            raise GraftlabError(f"the corrections cover part of a sliced parameter only: {said} have no factor; "
                                "give every slice one, or pass {allow_missing=True} to keep factor 1 there",
                                param="allow_missing")
        warnings.warn(f"corrections: parts of {len(uncovered)} sliced parameter(s) have no factor and keep "
                      f"factor 1: {said}", stacklevel=2)

    mult = [1.0] * len(names)
    scale: dict[int, Any] = {}
    for g in slices:
        i, dim, start, stop = slices[g]
        if i not in scale:
            import torch

            p = params[i]
            shape = [1] * p.dim()
            shape[dim] = p.shape[dim]
            scale[i] = torch.ones(shape, dtype=p.dtype, device=p.device)
        f = corrections.multipliers.get(g, 1.0)
        scale[i].narrow(dim, start, stop - start).fill_(float(f))
    for g, f in corrections.multipliers.items():
        if g not in slices:
            for i in targets[g]:
                mult[i] *= float(f)
    sliced = {g: pieces for g, pieces in corrections.schedule.items() if g in slices}
    overall, per_param = _schedules(corrections, targets, len(names), GLOBAL not in names, skip=sliced)
    param_groups = [{"params": [p], "lr": base_lr * m, "name": n, "factor": m} for n, p, m in zip(names, params, mult)]
    for i, t in scale.items():
        param_groups[i]["lr_scale"] = t
    pieces: dict[int, list] = {}
    for g, sched in sliced.items():  # per-slice schedules: lr_scale follows the step
        i, dim, start, stop = slices[g]
        pieces.setdefault(i, []).append((dim, start, stop, float(corrections.multipliers.get(g, 1.0)),
                                         Piecewise(sched)))
    for i, p in pieces.items():
        param_groups[i]["lr_scale_schedule"] = SliceSchedule(scale[i], p)
    group_factors = [Product(overall, *s) for s in per_param] if any(per_param) else None
    return Applied(
        param_groups=param_groups,
        lr_factor=overall if group_factors is None else None,
        group_lr_factors=group_factors,
        missing=missing,
        unknown=unknown,
    )
