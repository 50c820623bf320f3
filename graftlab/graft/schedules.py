"""Learning-rate schedules as pure ``step -> factor`` functions (multiply the base lr).

Attach one to an optimizer with ``torch.optim.lr_scheduler.LambdaLR(opt, schedule)``; the factor for
step ``s`` (0-based) is the one the ``s``-th optimizer step uses::

    >>> sched = make_schedule("poly", total_steps=100, warmup=10)
    >>> [round(sched(s), 3) for s in (0, 9, 10, 55, 99)]
    [0.1, 1.0, 1.0, 0.5, 0.011]

Every schedule starts with the same linear warmup ``(s + 1) / warmup`` for ``s < warmup`` (the first
step already moves the weights), then:

- ``constant``: 1.
- ``poly``: BERT's polynomial decay, ``((T - s) / (T - warmup)) ** power`` scaled into ``[end, 1]``
  (``power=1`` is BERT's linear decay).
- ``step``: ``gamma ** k`` after the ``k``-th milestone; milestones are fractions of ``T``
  (default ``0.5, 0.75``: x0.1 at half and at three quarters of training, as for ResNets).
- ``cosine``: half a cosine from 1 down to ``end`` over ``[warmup, T]``.

``warmup`` is a number of steps when it is at least 1, a fraction of ``total_steps`` when in ``[0, 1)``.

Two plain classes combine schedules: :class:`Piecewise` (a piecewise-constant ``[[start, factor],
...]`` list, as a corrections file holds) and :class:`Product` (the product of several schedules, e.g.
the run's own schedule times a correction). Both keep only plain attributes, no lambdas, so a
``LambdaLR`` holding them has a ``state_dict()`` that ``torch.save`` can write.
"""
from __future__ import annotations

import bisect
import math
from functools import partial
from typing import Callable, Optional, Sequence

from graftlab.errors import GraftlabError

Schedule = Callable[[int], float]

SCHEDULES = ("constant", "poly", "step", "cosine")


class Piecewise:
    """``step -> factor`` of a piecewise-constant schedule ``[[start, factor], ...]``.

    ``pieces`` must start at step 0 with increasing starts (as :func:`graftlab.corrections.load_corrections`
    checks); the factor of a piece holds from its start until the next piece's start.
    """

    def __init__(self, pieces: Sequence[Sequence[float]]):
        self.starts = [int(s) for s, _ in pieces]
        self.factors = [float(f) for _, f in pieces]

    def __call__(self, step: int) -> float:
        i = bisect.bisect_right(self.starts, int(step)) - 1
        return self.factors[max(i, 0)]

    def __repr__(self) -> str:
        return f"Piecewise({[list(p) for p in zip(self.starts, self.factors)]})"


class Product:
    """``step -> f_1(step) * f_2(step) * ...``; ``None`` factors are left out (no factors: 1.0).

    Made for ``LambdaLR``: its ``state_dict()`` saves a callable object's ``__dict__``, and
    ``torch.load`` (``weights_only=True`` by default) refuses anything but plain data. The factors
    are pure functions of the step, rebuilt with the scheduler, so they live in a slot and the
    ``__dict__`` the scheduler saves stays empty: a checkpoint holds no user lambda and no graftlab
    class, and loads as a plain ``LambdaLR(opt, fn)`` checkpoint does.
    """

    __slots__ = ("factors", "__dict__")

    def __init__(self, *factors: Optional[Schedule]):
        self.factors = [f for f in factors if f is not None]

    def __call__(self, step: int) -> float:
        out = 1.0
        for f in self.factors:
            out *= f(step)
        return out

    def __repr__(self) -> str:
        return f"Product({', '.join(map(repr, self.factors))})"


def warmup_steps(warmup: float, total_steps: int) -> int:
    """Resolve ``warmup`` (steps if >= 1, fraction of ``total_steps`` if in [0, 1)) to a step count."""
    if warmup is None:
        return 0
    if not math.isfinite(warmup) or warmup < 0:
        raise GraftlabError(f"{{warmup}} must be >= 0 (steps, or a fraction below 1), got {warmup}", param="warmup")
    steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    if steps >= total_steps:
        raise GraftlabError(f"{{warmup}} ({steps} steps) must be shorter than training ({total_steps} steps)",
                            param="warmup")
    return steps


def _warm(step: int, warmup: int) -> float:
    return (step + 1) / warmup


def constant(step: int, *, warmup: int = 0) -> float:
    return _warm(step, warmup) if step < warmup else 1.0


def poly(step: int, *, total_steps: int, warmup: int = 0, power: float = 1.0, end: float = 0.0) -> float:
    if step < warmup:
        return _warm(step, warmup)
    remaining = max(total_steps - step, 0) / (total_steps - warmup)
    return end + (1.0 - end) * remaining**power


def step_decay(
    step: int, *, total_steps: int, warmup: int = 0, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1
) -> float:
    if step < warmup:
        return _warm(step, warmup)
    passed = sum(step >= int(round(m * total_steps)) for m in milestones)
    return gamma**passed


def cosine(step: int, *, total_steps: int, warmup: int = 0, end: float = 0.0) -> float:
    if step < warmup:
        return _warm(step, warmup)
    progress = min((step - warmup) / (total_steps - warmup), 1.0)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedule(
    name: str,
    total_steps: int,
    warmup: float = 0,
    *,
    power: float = 1.0,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    end: float = 0.0,
) -> Schedule:
    """Build the named schedule for a run of ``total_steps`` optimizer steps.

    Raises :class:`GraftlabError` for an unknown name or inconsistent settings.
    """
    if name not in SCHEDULES:
        raise GraftlabError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    if total_steps is None or int(total_steps) < 1:
        raise GraftlabError(f"the run needs at least one step, got {total_steps}")
    total_steps = int(total_steps)
    w = warmup_steps(warmup, total_steps)
    if not 0 <= end <= 1:
        raise GraftlabError(f"schedule end factor must lie in [0, 1], got {end}")
    if name == "constant":
        return partial(constant, warmup=w)
    if name == "poly":
        if power <= 0:
            raise GraftlabError(f"power must be > 0 for the poly schedule, got {power}")
        return partial(poly, total_steps=total_steps, warmup=w, power=power, end=end)
    if name == "cosine":
        return partial(cosine, total_steps=total_steps, warmup=w, end=end)
    milestones = tuple(float(m) for m in milestones)
    if any(not 0 < m < 1 for m in milestones) or list(milestones) != sorted(milestones):
        raise GraftlabError(f"milestones must be increasing fractions in (0, 1) for the step schedule, got {list(milestones)}")
    if not 0 < gamma <= 1:
        raise GraftlabError(f"gamma must lie in (0, 1] for the step schedule, got {gamma}")
    return partial(step_decay, total_steps=total_steps, warmup=w, milestones=milestones, gamma=gamma)
