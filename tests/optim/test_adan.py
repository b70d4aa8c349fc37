"""Adan against a float64 NumPy transcription of the authors' adan.py (sail-sg/Adan)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import steepest

from .problems import logistic_regression_loss

SHAPES = [(5, 4), (7,), (3, 2, 2)]


def grad_fn(x: np.ndarray, i: int) -> np.ndarray:
    """Gradient of a smooth non-convex loss, different per tensor."""
    scale = np.linspace(0.5, 2.0 + i, x.size).reshape(x.shape)
    return 2 * scale * (x - 0.3) + 0.3 * np.cos(3 * x)


def init(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in SHAPES]


def adan_oracle(xs, steps, lr, betas, eps, wd, no_prox):
    """The authors' _single_tensor_adan, in NumPy: neg_pre_grad = -g_1 at step 1, bias-corrected m and
    diff, eps added after dividing sqrt(n) by sqrt(1 - b3^t), proximal or decoupled weight decay."""
    b1, b2, b3 = betas
    xs = [x.copy() for x in xs]
    m = [np.zeros_like(x) for x in xs]
    diff = [np.zeros_like(x) for x in xs]
    n = [np.zeros_like(x) for x in xs]
    prev = [None] * len(xs)
    for t in range(1, steps + 1):
        bc1, bc2, bc3 = 1 - b1**t, 1 - b2**t, 1 - b3**t
        for i, x in enumerate(xs):
            g = grad_fn(x, i)
            if prev[i] is None:
                prev[i] = g.copy()
            d = g - prev[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            diff[i] = b2 * diff[i] + (1 - b2) * d
            u = g + b2 * d
            n[i] = b3 * n[i] + (1 - b3) * u * u
            denom = np.sqrt(n[i]) / math.sqrt(bc3) + eps
            update = m[i] / bc1 / denom + (b2 / bc2) * diff[i] / denom
            if no_prox:
                xs[i] = x * (1 - lr * wd) - lr * update
            else:
                xs[i] = (x - lr * update) / (1 + lr * wd)
            prev[i] = g
    return xs


def run_steepest(xs, steps, **kw):
    params = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in xs]
    opt = steepest.Adan(params, **kw)
    for _ in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.from_numpy(grad_fn(p.detach().numpy(), i))
        opt.step()
    return [p.detach().numpy() for p in params], opt


@pytest.mark.parametrize("no_prox, compile", [(False, False), (True, False), (False, True)])
def test_matches_authors_algorithm_float64(no_prox, compile):
    kw = dict(lr=0.05, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.1, no_prox=no_prox)
    xs = init()
    want = adan_oracle(xs, 30, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"], no_prox)
    got, _ = run_steepest(xs, 30, compile=compile, **kw)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_first_step_has_no_gradient_difference():
    xs = init()
    _, opt = run_steepest(xs, 1, lr=0.1)
    for p in opt.param_groups[0]["params"]:
        st = opt.state[p]
        assert torch.count_nonzero(st["exp_avg_diff"]) == 0
        torch.testing.assert_close(st["prev_grad"], p.grad, rtol=0, atol=0)


def test_prox_and_no_prox_differ_only_through_weight_decay():
    xs = init()
    a, _ = run_steepest(xs, 5, lr=0.05, no_prox=True)
    b, _ = run_steepest(xs, 5, lr=0.05, no_prox=False)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_reaches_target_on_logistic_regression():
    assert logistic_regression_loss(lambda ps: steepest.Adan(ps, lr=0.05)) < 0.1
