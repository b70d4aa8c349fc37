"""Gravity against a float64 NumPy transcription of the paper's algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import steepest

from .problems import logistic_regression_loss, spiky_quadratic_loss

SHAPES = [(5, 4), (7,), (1,), (3, 2, 2)]


def grad_fn(x: np.ndarray, i: int) -> np.ndarray:
    scale = np.linspace(0.5, 2.0 + i, x.size).reshape(x.shape)
    return 2 * scale * (x - 0.3) + 0.3 * np.cos(3 * x)


def init(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in SHAPES]


def gravity_oracle(xs, v0s, steps, lr, beta):
    """Per weight tensor: m = 1/max|G|, zeta = G / (1 + (G/m)^2), b = (beta t + 1)/(t + 2) with t = 0 on the
    first update (Eq. 25, 27), V = b V + (1 - b) zeta, W <- W - lr V."""
    xs = [x.copy() for x in xs]
    vs = [v.copy() for v in v0s]
    for k in range(1, steps + 1):
        t = k - 1
        b = (beta * t + 1) / (t + 2)
        for i, x in enumerate(xs):
            g = grad_fn(x, i)
            m = 1.0 / np.max(np.abs(g))
            zeta = g / (1 + (g / m) ** 2)
            vs[i] = b * vs[i] + (1 - b) * zeta
            xs[i] = x - lr * vs[i]
    return xs


def run_steepest(xs, steps, seed=0, **kw):
    params = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in xs]
    torch.manual_seed(seed)  # V_0 is drawn, in parameter order, when the first step creates the state
    opt = steepest.Gravity(params, **kw)
    for _ in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.from_numpy(grad_fn(p.detach().numpy(), i))
        opt.step()
    return [p.detach().numpy() for p in params], opt


def velocities_drawn(xs, seed, lr, alpha):
    """The V_0 a fresh Gravity draws for these shapes under torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return [torch.empty(x.shape, dtype=torch.float64).normal_(0.0, alpha / lr).numpy() for x in xs]


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_matches_paper_algorithm_float64(alpha):
    kw = dict(lr=0.1, alpha=alpha, beta=0.9)
    xs = init()
    v0 = velocities_drawn(xs, 0, kw["lr"], alpha) if alpha > 0 else [np.zeros_like(x) for x in xs]
    want = gravity_oracle(xs, v0, 30, kw["lr"], kw["beta"])
    got, _ = run_steepest(xs, 30, seed=0, **kw)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_compiled_path_matches_oracle():
    xs = init()
    want = gravity_oracle(xs, [np.zeros_like(x) for x in xs], 5, 0.1, 0.8)
    got, _ = run_steepest(xs, 5, lr=0.1, alpha=0.0, beta=0.8, compile=True)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_initial_velocity_scale_and_seed():
    p = torch.nn.Parameter(torch.zeros(200, 100, dtype=torch.float64))
    p.grad = torch.zeros_like(p)
    torch.manual_seed(1)
    opt = steepest.Gravity([p], lr=0.1, alpha=0.05)
    opt.step()
    v = opt.state[p]["velocity"]
    # V_1 = V_0 / 2 for a zero gradient; V_0 ~ N(0, alpha / lr) = N(0, 0.5)
    assert abs((2 * v).std().item() - 0.5) < 0.01
    # The first move has size about alpha / 2 whatever the lr (paper Eq. 28-29).
    assert abs(p.std().item() - 0.025) < 0.001


def test_step_saturates_for_large_gradients():
    """zeta = g / (1 + (g max|g|)^2): the largest entry moves by max|g| / (1 + max|g|^4), not by max|g|."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad = torch.tensor([100.0, 1.0, 0.0], dtype=torch.float64)
    opt = steepest.Gravity([p], lr=1.0, alpha=0.0, beta=0.9)
    opt.step()
    expected = -0.5 * torch.tensor([100.0 / (1 + 1e8), 1.0 / (1 + 1e4), 0.0], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=0)


def test_reaches_target_on_logistic_regression():
    """Gradients below 1, as in the deep nets of the paper (large gradients saturate by design)."""
    torch.manual_seed(0)
    assert logistic_regression_loss(lambda ps: steepest.Gravity(ps, lr=1.0, alpha=0.01)) < 0.1  # measured 0.073


def test_saturated_step_rides_out_gradient_spikes():
    """zeta = g / (1 + (g max|g|)^2) is at most 1 / (2 max|g|): a gradient 1e4 times too large (an outlier batch
    every 25 steps) moves the weights less, not more. The unsaturated average of g (momentum SGD, dampening 0.9)
    blows up on the same gradients."""
    assert spiky_quadratic_loss(lambda ps: steepest.Gravity(ps, lr=0.3, alpha=0.0)) < 1e-4  # measured 2.9e-6
    assert not spiky_quadratic_loss(lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, dampening=0.9)) < 1.0
