"""ALR-SMAG (generalized Polyak step size with momentum) against a float64 NumPy transcription, and on
least squares, where f* = 0 is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import steepest

SHAPES = [(5, 4), (7,), (3, 2, 2)]
STEPS = 30


def make_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in SHAPES]


def loss_np(xs):
    """A smooth non-quadratic loss, a different curvature per coordinate, minimum 0 at x = 0.3 (f* = 0)."""
    total = 0.0
    for i, x in enumerate(xs):
        scale = np.linspace(0.5, 2.0 + i, x.size).reshape(x.shape)
        total += np.sum(scale * (x - 0.3) ** 2) + 0.1 * np.sum(1 - np.cos(3 * (x - 0.3)))
    return total


def grads_np(xs):
    out = []
    for i, x in enumerate(xs):
        scale = np.linspace(0.5, 2.0 + i, x.size).reshape(x.shape)
        out.append(2 * scale * (x - 0.3) + 0.3 * np.sin(3 * (x - 0.3)))
    return out


def loss_torch(params):
    total = 0.0
    for i, x in enumerate(params):
        scale = torch.linspace(0.5, 2.0 + i, x.numel(), dtype=x.dtype).reshape(x.shape)
        total = total + (scale * (x - 0.3) ** 2).sum() + 0.1 * (1 - torch.cos(3 * (x - 0.3))).sum()
    return total


def numpy_alr_smag(arrays, steps=STEPS, lr=1.0, momentum=0.9, f_star=0.0, c=1.0, weight_decay=0.0):
    """ALR-SMAG (arXiv 2305.12939): d_k = beta d_{k-1} + g_k over all parameters,
    eta_k = min((f(x_k) - f*) / (c ||d_k||^2), eta_max), x_{k+1} = x_k (1 - eta_k wd) - eta_k d_k."""
    xs = [a.copy() for a in arrays]
    ds = [np.zeros_like(a) for a in arrays]
    etas = []
    for _ in range(steps):
        f = loss_np(xs)
        gs = grads_np(xs)
        ds = [momentum * d + g for d, g in zip(ds, gs)]
        sq = sum(float(np.sum(d * d)) for d in ds)
        eta = min(max(f - f_star, 0.0) / (c * sq), lr)
        etas.append(eta)
        xs = [x * (1 - eta * weight_decay) - eta * d for x, d in zip(xs, ds)]
    return xs, etas


def run_torch(arrays, steps=STEPS, groups=None, **kwargs):
    params = [torch.nn.Parameter(torch.tensor(a, dtype=torch.float64)) for a in arrays]
    opt = steepest.ALRSMAG(groups(params) if groups else params, **kwargs)
    etas = []

    def closure():
        opt.zero_grad()
        loss = loss_torch(params)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        etas.append(opt.last_step_sizes[0])
    return [p.detach().numpy() for p in params], etas


@pytest.mark.parametrize("kwargs", [
    dict(lr=1.0, momentum=0.9),                      # the Polyak ratio is the active branch
    dict(lr=0.05, momentum=0.5),                     # the cap eta_max is active at first
    dict(lr=1.0, momentum=0.0),                      # Polyak's step size (SPS_max with c = 1)
    dict(lr=1.0, momentum=0.8, c=0.5, f_star=0.2, weight_decay=0.01),
])
def test_alr_smag_matches_numpy_transcription(kwargs):
    arrays = make_arrays()
    got, etas = run_torch(arrays, **kwargs)
    want, want_etas = numpy_alr_smag(arrays, **kwargs)
    np.testing.assert_allclose(etas, want_etas, rtol=1e-10)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert any(e < kwargs["lr"] for e in want_etas), "the Polyak branch of the min was never taken"
    if kwargs["lr"] < 0.1:
        assert want_etas[0] == kwargs["lr"], "the cap branch of the min was never taken"


def test_step_size_is_global_across_param_groups():
    arrays = make_arrays(1)
    got, _ = run_torch(arrays, groups=lambda ps: [{"params": ps[:1]}, {"params": ps[1:], "momentum": 0.9}],
                       lr=1.0, momentum=0.9)
    want, _ = numpy_alr_smag(arrays, lr=1.0, momentum=0.9)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_global_options_must_agree_across_groups():
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    opt = steepest.ALRSMAG(ps[:1])
    with pytest.raises(ValueError, match="f_star"):
        opt.add_param_group({"params": ps[1:], "f_star": 1.0})
    assert len(opt.param_groups) == 1


def test_needs_a_closure_returning_the_loss():
    p = torch.nn.Parameter(torch.ones(3))
    opt = steepest.ALRSMAG([p])
    with pytest.raises(ValueError, match="closure"):
        opt.step()

    def no_loss():
        opt.zero_grad()
        (p**2).sum().backward()

    with pytest.raises(ValueError, match="None"):
        opt.step(no_loss)


def test_least_squares_with_known_optimum_converges_linearly():
    """A consistent least-squares problem has f* = 0: the step needs no learning rate at all."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(40, 20, generator=gen, dtype=torch.float64) @ torch.diag(torch.logspace(-1, 0, 20,
                                                                                           dtype=torch.float64))
    x_star = torch.randn(20, generator=gen, dtype=torch.float64)
    b = A @ x_star
    x = torch.nn.Parameter(torch.zeros(20, dtype=torch.float64))
    opt = steepest.ALRSMAG([x], lr=1e3, momentum=0.9, f_star=0.0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((A @ x - b) ** 2).sum()
        loss.backward()
        return loss

    f0 = float(closure().detach())
    for _ in range(500):
        opt.step(closure)
    assert float(closure().detach()) < 1e-10 * f0
    torch.testing.assert_close(x.detach(), x_star, rtol=1e-3, atol=1e-3)
