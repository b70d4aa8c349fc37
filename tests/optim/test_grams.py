"""Grams against float64 NumPy transcriptions of the paper's Algorithm 1 and of the authors' code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import steepest

from . import trajectory
from .trajectory import grad_fn

SHAPES = [(5, 4), (7,), (3, 2, 2)]
STEPS = 30


make_arrays, run_torch = trajectory.bind(SHAPES, STEPS)


def paper_grams(arrays, steps=STEPS, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Algorithm 1 of arXiv 2412.17107."""
    b1, b2 = betas
    xs = [a.copy() for a in arrays]
    m = [np.zeros_like(a) for a in arrays]
    v = [np.zeros_like(a) for a in arrays]
    for t in range(1, steps + 1):
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            u = m_hat / (np.sqrt(v_hat) + eps)
            u_hat = np.sign(g) * np.abs(u)
            x -= lr * (u_hat + weight_decay * x)
    return xs


def authors_grams(arrays, steps=STEPS, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
    """Gunale0926/Grams grams/src/grams.py (the grams-pytorch package)."""
    b1, b2 = betas
    xs = [a.copy() for a in arrays]
    m = [np.zeros_like(a) for a in arrays]
    v = [np.zeros_like(a) for a in arrays]
    for t in range(1, steps + 1):
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t)
            if weight_decay > 0:
                x += -lr * weight_decay * x
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = np.sqrt(v[i]) + eps
            step_size = lr
            if correct_bias:
                step_size = step_size * math.sqrt(1 - b2**t) / (1 - b1**t)
            x -= step_size * np.sign(g) * np.abs(m[i]) / denom
    return xs


@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2),
    dict(lr=3e-2, betas=(0.8, 0.99), weight_decay=0.1),
    dict(lr=1e-2, betas=(0.95, 0.9), eps=1e-3, weight_decay=1e-2),
])
def test_matches_paper_algorithm(kwargs):
    arrays = make_arrays()
    got = run_torch(lambda ps: steepest.Grams(ps, **kwargs), arrays)
    want = paper_grams(arrays, **kwargs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2, eps=1e-6),
    dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1),
    dict(lr=1e-2, eps=1e-6, weight_decay=1e-2, correct_bias=False),
])
def test_reference_eps_mode_matches_authors_code(kwargs):
    arrays = make_arrays(1)
    got = run_torch(lambda ps: steepest.Grams(ps, eps_mode="reference", **kwargs), arrays)
    want = authors_grams(arrays, **kwargs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_eps_placement_is_visible():
    """The two eps placements give different, but close, trajectories."""
    arrays = make_arrays()
    a = run_torch(lambda ps: steepest.Grams(ps, lr=1e-2, eps=1e-6), arrays)
    b = run_torch(lambda ps: steepest.Grams(ps, lr=1e-2, eps=1e-6, eps_mode="reference"), arrays)
    diff = max(np.max(np.abs(x - y)) for x, y in zip(a, b))
    assert 1e-10 < diff < 1e-4


def test_moves_against_the_current_gradient():
    arrays = make_arrays(2)
    params = [torch.nn.Parameter(torch.tensor(a)) for a in arrays]
    opt = steepest.Grams(params, lr=1e-2)
    for t in range(1, 8):
        grads = [grad_fn(i, p.detach().numpy(), t) for i, p in enumerate(params)]
        before = [p.detach().clone().numpy() for p in params]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        opt.step()
        for p, b, g in zip(params, before, grads):
            assert np.array_equal(np.sign(p.detach().numpy() - b), -np.sign(g))


def test_trains_a_small_classifier():
    """Behaviour: Grams fits a small MLP classifier to low training loss (the paper: as fast as Adam or faster)."""
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x @ torch.randn(10, 3)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = steepest.Grams(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
