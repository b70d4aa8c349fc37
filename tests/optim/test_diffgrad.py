"""diffGrad against a float64 NumPy transcription of the authors' shivram1987/diffGrad diffGrad_v2.py."""

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


make_arrays, run_torch = trajectory.bind(SHAPES, STEPS, with_opt=True)


def authors_diffgrad(arrays, steps=STEPS, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    b1, b2 = betas
    xs = [a.copy() for a in arrays]
    m = [np.zeros_like(a) for a in arrays]
    v = [np.zeros_like(a) for a in arrays]
    prev = [np.zeros_like(a) for a in arrays]
    for t in range(1, steps + 1):
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t)
            if weight_decay != 0:
                g = g + weight_decay * x
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = np.sqrt(v[i]) + eps
            dfc = 1.0 / (1.0 + np.exp(-np.abs(prev[i] - g)))
            prev[i] = g.copy()
            step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            x -= step_size * (m[i] * dfc) / denom
    return xs


@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2),
    dict(lr=3e-2, betas=(0.8, 0.99), weight_decay=0.1),
    dict(lr=1e-2, betas=(0.95, 0.9), eps=1e-3, weight_decay=1e-2),
])
@pytest.mark.parametrize("compile", [False, True])
def test_matches_authors_transcription(kwargs, compile):
    # Compiled, the friction is folded into the denominator (one division): its own formula, checked here too.
    arrays = make_arrays()
    got, _ = run_torch(lambda ps: steepest.DiffGrad(ps, compile=compile, **kwargs), arrays)
    want = authors_diffgrad(arrays, **kwargs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_previous_grad_holds_the_last_gradient_with_weight_decay():
    arrays = make_arrays()
    params = [torch.nn.Parameter(torch.tensor(a)) for a in arrays]
    opt = steepest.DiffGrad(params, lr=1e-2, weight_decay=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(opt.state[p]["previous_grad"], 1.0 + 0.1 * b, rtol=1e-15, atol=0)
        assert torch.equal(p.grad, torch.ones_like(p)), "the gradient itself is left as it was"


def test_constant_gradient_halves_the_step():
    """With g_t = g_{t-1}, xi = sigmoid(0) = 1/2: the step is half Adam's (eps-hat form)."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = steepest.DiffGrad([p], lr=1e-2, betas=(0.0, 0.0))
    for _ in range(3):
        p.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        before = p.detach().clone()
        opt.step()
    torch.testing.assert_close(p.detach() - before, -0.5e-2 * torch.sign(p.grad), rtol=1e-7, atol=0)


def test_trains_a_small_classifier():
    """Behaviour: diffGrad fits a small MLP classifier to low training loss (the paper: CNNs on CIFAR)."""
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x @ torch.randn(10, 3)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = steepest.DiffGrad(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
