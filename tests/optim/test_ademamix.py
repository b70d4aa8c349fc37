"""AdEMAMix against a float64 NumPy transcription of the authors' apple/ml-ademamix pytorch/ademamix.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import steepest
from steepest.optim.ademamix import half_life_warmup, linear_warmup

from . import trajectory
from .trajectory import grad_fn

SHAPES = [(5, 4), (7,), (3, 2, 2)]
STEPS = 30


make_arrays, run_torch = trajectory.bind(SHAPES, STEPS, with_opt=True)


# --- the authors' schedulers and step, transcribed independently -------------------------------------
def oracle_alpha(step, alpha_end, warmup):
    if step < warmup:
        a = step / warmup
        return (1.0 - a) * 0.0 + a * alpha_end
    return alpha_end


def oracle_beta3(step, beta_end, beta_start, warmup):
    def half_life(beta):
        return np.log(0.5) / np.log(beta + 1e-8) - 1.0

    if step < warmup:
        a = step / warmup
        return 0.5 ** (1.0 / ((1.0 - a) * half_life(beta_start) + a * half_life(beta_end) + 1.0))
    return beta_end


def authors_ademamix(arrays, steps=STEPS, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None,
                     alpha_warmup=None, eps=1e-8, weight_decay=0.0):
    b1, b2, b3_final = betas
    xs = [a.copy() for a in arrays]
    m1 = [np.zeros_like(a) for a in arrays]
    m2 = [np.zeros_like(a) for a in arrays]
    v = [np.zeros_like(a) for a in arrays]
    for t in range(1, steps + 1):
        a_t = alpha if alpha_warmup is None else oracle_alpha(t, alpha, alpha_warmup)
        b3 = b3_final if beta3_warmup is None else oracle_beta3(t, b3_final, b1, beta3_warmup)
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t)
            m1[i] = b1 * m1[i] + (1 - b1) * g if b1 != 0.0 else g
            m2[i] = b3 * m2[i] + (1 - b3) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = np.sqrt(v[i]) / math.sqrt(1 - b2**t) + eps
            update = (m1[i] / (1 - b1**t) + a_t * m2[i]) / denom
            update = update + weight_decay * x
            x -= lr * update
    return xs


def test_schedulers_match_the_authors():
    for t in range(0, 60):
        assert linear_warmup(t, end=5.0, start=0.0, warmup=40) == pytest.approx(oracle_alpha(t, 5.0, 40), rel=1e-15)
        assert half_life_warmup(t, end=0.9999, start=0.9, warmup=40) == pytest.approx(
            oracle_beta3(t, 0.9999, 0.9, 40), rel=1e-14)
    # beta3 starts (up to the 1e-8 inside the log) at beta1, grows monotonically, and ends at beta3.
    values = [half_life_warmup(t, end=0.9999, start=0.9, warmup=40) for t in range(0, 41)]
    assert values[0] == pytest.approx(0.9, abs=1e-6)
    assert all(a < b for a, b in zip(values, values[1:40]))
    assert values[40] == 0.9999
    # The half-life, not beta3, moves linearly: half way, beta3's half-life (f_inv's exact inverse, with no
    # 1e-8) is the mean of the two ends' half-lives (computed, as the authors do, with the 1e-8).
    def half_life(beta, eps=1e-8):
        return math.log(0.5) / math.log(beta + eps) - 1

    assert half_life(values[20], eps=0.0) == pytest.approx((half_life(0.9) + half_life(0.9999)) / 2, rel=1e-9)


CASES = [
    dict(lr=1e-2),
    dict(lr=1e-2, alpha=5.0, alpha_warmup=20, beta3_warmup=20, weight_decay=0.1),
    dict(lr=3e-2, betas=(0.8, 0.99, 0.999), alpha=8.0, alpha_warmup=12, beta3_warmup=40, eps=1e-3),
    dict(lr=1e-2, betas=(0.0, 0.999, 0.9999), alpha=3.0, alpha_warmup=10, beta3_warmup=10, weight_decay=1e-2),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_matches_authors_transcription(kwargs):
    arrays = make_arrays()
    got, opt = run_torch(lambda ps: steepest.AdEMAMix(ps, **kwargs), arrays)
    want = authors_ademamix(arrays, **kwargs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_beta1_zero_keeps_no_fast_ema():
    _, opt = run_torch(lambda ps: steepest.AdEMAMix(ps, lr=1e-2, betas=(0.0, 0.999, 0.9999)), make_arrays(), steps=2)
    for state in opt.state.values():
        assert set(state) == {"step", "exp_avg_slow", "exp_avg_sq"}


def test_bad_warmup_rejected():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="beta3_warmup"):
        steepest.AdEMAMix(p, beta3_warmup=0)
    with pytest.raises(TypeError, match="alpha_warmup"):
        steepest.AdEMAMix(p, alpha_warmup=2.5)


def test_trains_a_small_classifier():
    """Behaviour: AdEMAMix with its warm-ups fits a small MLP classifier to low training loss."""
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x @ torch.randn(10, 3)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = steepest.AdEMAMix(model.parameters(), lr=1e-2, alpha_warmup=100, beta3_warmup=100)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
