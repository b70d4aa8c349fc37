"""NAdamW against a float64 NumPy transcription of the AlgoPerf baseline and against torch.optim.NAdam."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import steepest
from steepest.optim.nadamw import _MuProducts

from . import trajectory
from .trajectory import grad_fn

SHAPES = [(5, 4), (7,), (3, 2, 2)]
STEPS = 30


make_arrays, run_torch = trajectory.bind(SHAPES, STEPS)


def algoperf_nadamw(arrays, steps=STEPS, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """mlcommons/algorithmic-efficiency prize_qualification_baselines NAdamW, transcribed in float64."""
    b1, b2 = betas
    xs = [a.copy() for a in arrays]
    m = [np.zeros_like(a) for a in arrays]
    v = [np.zeros_like(a) for a in arrays]
    for t in range(1, steps + 1):
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t)
            x *= 1 - lr * weight_decay
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            nesterov = b1 * m[i] + (1 - b1) * g
            denom = np.sqrt(v[i]) / math.sqrt(1 - b2**t) + eps
            x -= lr / (1 - b1**t) * nesterov / denom
    return xs


@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2),
    dict(lr=3e-2, betas=(0.8, 0.99), weight_decay=0.1),
    dict(lr=1e-2, betas=(0.95, 0.9), eps=1e-3, weight_decay=1e-2),
    dict(lr=1e-2, betas=(0.0, 0.999)),
])
def test_matches_algoperf_transcription(kwargs):
    arrays = make_arrays()
    got = run_torch(lambda ps: steepest.NAdamW(ps, **kwargs), arrays)
    want = algoperf_nadamw(arrays, **kwargs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.fixture
def float64_default():
    # torch.optim.NAdam keeps its mu product in float64 only when that is the default dtype.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2, momentum_decay=4e-3),
    dict(lr=3e-2, betas=(0.8, 0.99), weight_decay=0.1, momentum_decay=4e-3),
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-3, weight_decay=1e-2, momentum_decay=0.1),
    dict(lr=1e-2, momentum_decay=0.0),
])
def test_momentum_decay_matches_torch_nadam(kwargs, float64_default):
    arrays = make_arrays(1)
    got = run_torch(lambda ps: steepest.NAdamW(ps, **kwargs), arrays)
    want = run_torch(lambda ps: torch.optim.NAdam(ps, decoupled_weight_decay=True, **kwargs), arrays)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_algoperf_form_differs_from_torch_nadam():
    arrays = make_arrays()
    a = run_torch(lambda ps: steepest.NAdamW(ps, lr=1e-2), arrays, steps=3)
    b = run_torch(lambda ps: torch.optim.NAdam(ps, lr=1e-2, decoupled_weight_decay=True), arrays, steps=3)
    assert not np.allclose(a[0], b[0], rtol=1e-6)


def test_mu_products_equal_sequential_product_after_jumps():
    beta1, psi = 0.9, 4e-3
    want, prod = {}, 1.0
    for t in range(1, 3001):
        prod *= beta1 * (1.0 - 0.5 * (0.96 ** (t * psi)))
        want[t] = prod
    cache = _MuProducts()
    for t in [1, 2, 3, 2500, 2501, 10, 1024, 1025, 2048, 3000, 7, 2049]:
        assert cache(beta1, psi, t) == want[t]


def test_bad_momentum_decay_rejected():
    with pytest.raises(ValueError, match="momentum_decay"):
        steepest.NAdamW([torch.nn.Parameter(torch.zeros(2))], momentum_decay=-1.0)


def test_trains_a_small_classifier():
    """Behaviour: NAdamW fits a small MLP classifier (the AlgoPerf baseline's use) to low training loss."""
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x @ torch.randn(10, 3)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = steepest.NAdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
