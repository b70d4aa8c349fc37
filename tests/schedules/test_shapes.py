"""Closed forms of the pure schedules at many points, composition, specs and bad input."""

import math

import numpy as np
import pytest

from steepest import schedules as S

STEPS = np.arange(0, 1200)


def _ramp(t, w, start=0.0):
    return start + (1 - start) * t / w


def cosine_ref(t, total, warmup, f, start=0.0):
    t = np.asarray(t, dtype=np.float64)
    p = np.clip((t - warmup) / (total - warmup), 0, 1)
    decay = f + (1 - f) * 0.5 * (1 + np.cos(np.pi * p))
    return np.where(t < warmup, _ramp(t, max(warmup, 1), start), decay)


def linear_ref(t, total, warmup, f):
    t = np.asarray(t, dtype=np.float64)
    p = np.clip((t - warmup) / (total - warmup), 0, 1)
    return np.where(t < warmup, _ramp(t, max(warmup, 1)), f + (1 - f) * (1 - p))


def wsd_ref(t, total, warmup, decay, shape, f):
    t = np.asarray(t, dtype=np.float64)
    d = int(math.floor(decay * total + 0.5))
    s = total - d
    x = np.clip((t - s) / max(d, 1), 0, 1)
    cool = {"linear": 1 - x, "1-sqrt": 1 - np.sqrt(x), "cosine": 0.5 * (1 + np.cos(np.pi * x))}[shape]
    out = np.where((t < s) | (d == 0), 1.0, f + (1 - f) * cool)  # decay=0: no cooldown at all
    return np.where(t < warmup, _ramp(t, max(warmup, 1)), out)


@pytest.mark.parametrize("total,warmup,f", [(1000, 0, 0.0), (1000, 100, 0.0), (500, 37, 0.1), (7, 3, 0.5)])
def test_cosine_closed_form(total, warmup, f):
    sched = S.Cosine(total=total, warmup=warmup, final_lr_ratio=f)
    got = np.array([sched(int(t)) for t in STEPS])
    np.testing.assert_allclose(got, cosine_ref(STEPS, total, warmup, f), rtol=0, atol=1e-15)
    assert sched(total) == pytest.approx(f, abs=1e-15)
    assert sched(total + 10_000) == pytest.approx(f, abs=1e-15)
    if warmup:
        assert sched(0) == 0.0 and sched(warmup) == 1.0
        assert sched(warmup // 2) == pytest.approx((warmup // 2) / warmup)
    # midpoint of the decay is halfway between 1 and the floor
    if (total - warmup) % 2 == 0:
        assert sched(warmup + (total - warmup) // 2) == pytest.approx((1 + f) / 2, abs=1e-15)


def test_cosine_warmup_start():
    sched = S.Cosine(total=100, warmup=10, warmup_start=0.1)
    np.testing.assert_allclose([sched(t) for t in range(100)], cosine_ref(np.arange(100), 100, 10, 0.0, 0.1),
                               atol=1e-15)


@pytest.mark.parametrize("total,warmup,f", [(1000, 0, 0.0), (1000, 250, 0.0), (300, 20, 0.05)])
def test_linear_decay_closed_form(total, warmup, f):
    sched = S.LinearDecay(total=total, warmup=warmup, final_lr_ratio=f)
    got = np.array([sched(int(t)) for t in STEPS])
    np.testing.assert_allclose(got, linear_ref(STEPS, total, warmup, f), atol=1e-15)
    q = (total - warmup) // 4
    assert sched(warmup + q) == pytest.approx(f + (1 - f) * (1 - q / (total - warmup)), abs=1e-15)


@pytest.mark.parametrize("warmup", [0, 1, 16, 400])
def test_inverse_sqrt_closed_form(warmup):
    sched = S.InverseSqrt(warmup=warmup)
    for t in range(0, 3000, 7):
        if t < warmup:
            expect = t / warmup
        else:
            expect = math.sqrt(max(warmup, 1) / max(t, 1))
        assert sched(t) == pytest.approx(expect, rel=1e-14, abs=1e-15)
    if warmup:
        assert sched(warmup) == 1.0 and sched(4 * warmup) == pytest.approx(0.5)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine"])
@pytest.mark.parametrize("total,warmup,decay,f", [(1000, 100, 0.2, 0.0), (1000, 0, 0.1, 0.0), (333, 10, 0.5, 0.1),
                                                  (1000, 0, 1.0, 0.0), (1000, 50, 0.0, 0.0)])
def test_wsd_closed_form(shape, total, warmup, decay, f):
    sched = S.WSD(total=total, warmup=warmup, decay=decay, shape=shape, final_lr_ratio=f)
    got = np.array([sched(int(t)) for t in STEPS])
    np.testing.assert_allclose(got, wsd_ref(STEPS, total, warmup, decay, shape, f), atol=1e-15)


def test_wsd_hagele_shapes_at_points():
    # total 1000, 20% cooldown: cooldown starts at 800; x = 0.25 at step 850
    for shape, expect in [("linear", 0.75), ("1-sqrt", 0.5), ("cosine", 0.5 * (1 + math.cos(math.pi / 4)))]:
        sched = S.WSD(total=1000, warmup=100, decay=0.2, shape=shape)
        assert sched(850) == pytest.approx(expect, abs=1e-15)
        assert sched(799) == 1.0 and sched(800) == 1.0 and sched(1000) == 0.0 and sched(50) == 0.5
    assert S.WSD(total=1000, decay=0.2).decay_start == 800


def test_warmup_and_constant():
    sched = S.Warmup(warmup=10, start=0.2)
    assert [sched(t) for t in (0, 5, 10, 99)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert S.Constant()(123) == 1.0


def test_join_composes_relative_steps():
    joined = S.Join([S.Warmup(warmup=10), S.Cosine(total=90, final_lr_ratio=0.1)], boundaries=[10])
    ref = S.Cosine(total=100, warmup=10, final_lr_ratio=0.1)
    assert joined.total == 100
    np.testing.assert_allclose(joined.multipliers(150), ref.multipliers(150), atol=1e-15)
    three = S.Join([S.Constant(), S.LinearDecay(total=10), S.Constant()], boundaries=[5, 15])
    assert three(4) == 1.0 and three(5) == 1.0 and three(10) == 0.5 and three(20) == 1.0 and three.total is None


def test_tabulated_holds_last_value():
    tab = S.Tabulated([1.0, 0.5, 0.25])
    assert [tab(t) for t in range(5)] == [1.0, 0.5, 0.25, 0.25, 0.25]
    np.testing.assert_array_equal(tab.multipliers(), [1.0, 0.5, 0.25])


@pytest.mark.parametrize("sched", [S.Constant(), S.Warmup(warmup=5), S.Cosine(total=50, warmup=5, final_lr_ratio=0.1),
                                   S.LinearDecay(total=9), S.InverseSqrt(warmup=3), S.WSD(total=40, shape="cosine"),
                                   S.Tabulated([1.0, 0.3]),
                                   S.Join([S.Warmup(warmup=3), S.WSD(total=20)], boundaries=[3])])
def test_spec_round_trip(sched):
    again = S.from_spec(sched.spec())
    assert again == sched
    assert [again(t) for t in range(60)] == [sched(t) for t in range(60)]


@pytest.mark.parametrize("make,name", [
    (lambda: S.Cosine(total=100, warmup=200), "warmup"),
    (lambda: S.Cosine(total=100, warmup=100), "warmup"),
    (lambda: S.LinearDecay(total=10, warmup=11), "warmup"),
    (lambda: S.WSD(total=100, warmup=90, decay=0.2), "warmup"),
    (lambda: S.WSD(total=100, warmup=10, decay=1.0), "warmup"),
    (lambda: S.Warmup(warmup=20, total=10), "warmup"),
    (lambda: S.InverseSqrt(warmup=20, total=10), "warmup"),
    (lambda: S.Cosine(total=0), "total"),
    (lambda: S.Cosine(total=-5), "total"),
    (lambda: S.WSD(total=0), "total"),
    (lambda: S.LinearDecay(total=2.5), "total"),
    (lambda: S.WSD(total=100, decay=-0.1), "decay"),
    (lambda: S.WSD(total=100, decay=1.5), "decay"),
    (lambda: S.WSD(total=100, shape="sqrt"), "shape"),
    (lambda: S.Cosine(total=100, final_lr_ratio=-0.1), "final_lr_ratio"),
    (lambda: S.Cosine(total=100, warmup=-1), "warmup"),
    (lambda: S.Join([S.Constant(), S.Constant()], boundaries=[]), "boundaries"),
    (lambda: S.Tabulated([]), "values"),
    (lambda: S.Tabulated([1.0, float("nan")]), "values"),
    (lambda: S.Cosine(total=10)(-1), "step"),
])
def test_bad_input_names_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()
