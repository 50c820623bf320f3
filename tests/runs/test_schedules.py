"""Schedules against hand-computed factors."""
import math

import pytest

from graftlab.errors import GraftlabError
from graftlab.graft.schedules import SCHEDULES, make_schedule, warmup_steps


def values(name, total, warmup, steps, **kw):
    s = make_schedule(name, total, warmup, **kw)
    return [s(t) for t in steps]


def test_constant_with_warmup():
    assert values("constant", 10, 4, range(6)) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert values("constant", 10, 0, [0, 9]) == [1.0, 1.0]


def test_poly_linear_is_berts_warmup_then_linear_decay():
    # warmup 10 of 100: (s+1)/10, then (100 - s) / 90
    got = values("poly", 100, 10, [0, 4, 9, 10, 40, 55, 99])
    assert got == pytest.approx([0.1, 0.5, 1.0, 1.0, 60 / 90, 45 / 90, 1 / 90])


def test_poly_power_and_end():
    got = values("poly", 20, 0, [0, 10, 15], power=2.0, end=0.1)
    assert got == pytest.approx([1.0, 0.1 + 0.9 * 0.25, 0.1 + 0.9 * 0.0625])


def test_step_decay_at_fractions():
    got = values("step", 100, 5, [0, 4, 5, 49, 50, 74, 75, 99])
    assert got == pytest.approx([0.2, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    got = values("step", 10, 0, [2, 3, 9], milestones=[0.3], gamma=0.5)
    assert got == pytest.approx([1.0, 0.5, 0.5])


def test_cosine():
    got = values("cosine", 12, 2, [0, 1, 2, 7, 12])
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi * 0.5)), 0.0])
    assert values("cosine", 10, 0, [5], end=0.2)[0] == pytest.approx(0.2 + 0.8 * 0.5)


def test_warmup_fraction_and_steps():
    assert warmup_steps(0.1, 300) == 30
    assert warmup_steps(7, 300) == 7
    assert warmup_steps(0, 300) == 0


@pytest.mark.parametrize(
    "name,total,warmup,kw",
    [("linear", 10, 0, {}), ("poly", 0, 0, {}), ("poly", 10, 10, {}), ("poly", 10, -1, {}),
     ("step", 10, 0, {"milestones": [0.8, 0.5]}), ("step", 10, 0, {"gamma": 0}), ("poly", 10, 0, {"power": 0})],
)
def test_bad_settings(name, total, warmup, kw):
    with pytest.raises(GraftlabError):
        make_schedule(name, total, warmup, **kw)


def test_every_schedule_is_positive_over_the_run():
    for name in SCHEDULES:
        s = make_schedule(name, 50, 0.1)
        assert all(s(t) > 0 for t in range(49)), name


def test_piecewise_and_product():
    import pickle

    from graftlab.graft.schedules import Piecewise, Product

    p = Piecewise([[0, 0.5], [3, 2.0], [5, 0.25]])
    assert [p(s) for s in range(7)] == [0.5, 0.5, 0.5, 2.0, 2.0, 0.25, 0.25]
    run = make_schedule("constant", 10, 2)
    prod = Product(p, None, run)
    assert [prod(s) for s in range(4)] == [0.25, 0.5, 0.5, 2.0]
    assert Product()(7) == 1.0 and Product(None)(7) == 1.0
    back = pickle.loads(pickle.dumps(prod))  # plain attributes: what LambdaLR's state_dict holds
    assert [back(s) for s in range(7)] == [prod(s) for s in range(7)]
