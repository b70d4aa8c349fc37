"""TAM, AdaTAM and AdaTAMW against float64 NumPy transcriptions of the Torque-Aware Momentum equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import steepest

from . import trajectory
from .problems import ill_conditioned_quadratic_loss

SHAPES = [(5, 4), (7,), (3, 2, 2)]
STEPS = 30


def make_arrays(seed=0):
    return trajectory.make_arrays(SHAPES, seed)


def run_torch(make_opt, arrays, steps=STEPS):
    return trajectory.run_torch_full(make_opt, arrays, steps, grad=grad_fn)




def grad_fn(i, x, t):
    """A smooth loss's gradient plus a step-dependent disturbance, so that alignment changes sign."""
    scale = np.linspace(0.5, 2.0 + i, x.size).reshape(x.shape)
    return 2 * scale * (x - 0.3) + 0.3 * np.cos(3 * x) + 0.8 * np.sin(1.3 * t + np.arange(x.size).reshape(x.shape))


def cosine(a, b):
    """cos(a, b) over the whole tensor; 0 when either is zero (m_0 = 0 at the first step)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na * nb == 0 else float(np.sum(a * b) / (na * nb))


def numpy_tam(arrays, steps=STEPS, lr=1e-3, momentum=0.9, decay=0.9, eps=1e-8, weight_decay=0.0):
    """TAM (arXiv 2412.18790): s_t = g s + (1-g) cos(m_{t-1}, g_t); m_t = b m + ((1+s)/2 + eps) g_t."""
    xs = [a.copy() for a in arrays]
    m = [np.zeros_like(a) for a in arrays]
    s = [0.0 for _ in arrays]
    for t in range(1, steps + 1):
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t) + weight_decay * x
            s[i] = decay * s[i] + (1 - decay) * cosine(m[i], g)
            m[i] = momentum * m[i] + ((1 + s[i]) / 2 + eps) * g
            x -= lr * m[i]
    return xs, s


def numpy_adatam(arrays, steps=STEPS, lr=1e-3, betas=(0.9, 0.999), decay=0.9, eps=1e-8, weight_decay=0.0,
                 decoupled=False):
    """AdaTAM: the damped first moment of TAM, Adam's second moment, p -= lr m / (sqrt(v) + eps)."""
    b1, b2 = betas
    xs = [a.copy() for a in arrays]
    m = [np.zeros_like(a) for a in arrays]
    v = [np.zeros_like(a) for a in arrays]
    s = [0.0 for _ in arrays]
    for t in range(1, steps + 1):
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t)
            if decoupled:
                x *= 1 - lr * weight_decay
            else:
                g = g + weight_decay * x
            s[i] = decay * s[i] + (1 - decay) * cosine(m[i], g)
            m[i] = b1 * m[i] + ((1 + s[i]) / 2 + eps) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            x -= lr * m[i] / (np.sqrt(v[i]) + eps)
    return xs, s


def close(got, want, rtol=1e-10):
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("kwargs,compile", [
    (dict(lr=0.02), False),
    (dict(lr=0.03, momentum=0.95, decay=0.5, eps=1e-3), False),
    (dict(lr=0.02, momentum=0.8, decay=0.0, weight_decay=0.05), False),
    (dict(lr=0.02, momentum=0.8, decay=0.7, weight_decay=0.05), True),
])
def test_tam_matches_numpy_transcription(kwargs, compile):
    arrays = make_arrays()
    got, opt, params = run_torch(lambda ps: steepest.TAM(ps, compile=compile, **kwargs), arrays)
    want, s = numpy_tam(arrays, **kwargs)
    close(got, want)
    for p, si in zip(params, s):
        assert opt.state[p]["s"].item() == pytest.approx(si, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("cls,kwargs,compile", [
    (steepest.AdaTAM, dict(lr=1e-3), False),
    (steepest.AdaTAM, dict(lr=2e-3, betas=(0.8, 0.99), decay=0.6, eps=1e-4, weight_decay=0.1), False),
    (steepest.AdaTAMW, dict(lr=2e-3, betas=(0.8, 0.99), decay=0.6, weight_decay=0.1), False),
    (steepest.AdaTAMW, dict(lr=2e-3, betas=(0.8, 0.99), decay=0.6, weight_decay=0.1), True),
])
def test_adatam_matches_numpy_transcription(cls, kwargs, compile):
    arrays = make_arrays(1)
    got, opt, params = run_torch(lambda ps: cls(ps, compile=compile, **kwargs), arrays)
    want, s = numpy_adatam(arrays, decoupled=cls is steepest.AdaTAMW, **kwargs)
    close(got, want)
    for p, si in zip(params, s):
        assert opt.state[p]["s"].item() == pytest.approx(si, rel=1e-10, abs=1e-14)


def test_cosine_is_per_tensor_not_per_row_or_element():
    """A gradient that reverses one row of a matrix and keeps the rest: per-tensor alignment stays high."""
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = steepest.TAM([p], lr=0.0, momentum=0.9, decay=0.0)
    g = torch.ones(4, 3, dtype=torch.float64)
    p.grad = g.clone()
    opt.step()  # m_1 = (1/2 + eps) g
    g2 = g.clone()
    g2[0] = -1.0
    p.grad = g2
    opt.step()
    # decay = 0: s_2 = cos(m_1, g_2) = (12 - 2*3)/12 = 0.5 over the whole tensor.
    assert opt.state[p]["s"].item() == pytest.approx(0.5, rel=1e-14)


def test_misaligned_gradient_is_damped():
    """A gradient opposite to the momentum enters with weight (1 + s)/2 + eps, near eps when s ~ -1."""
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = steepest.TAM([p], lr=0.0, momentum=0.9, decay=0.0, eps=1e-8)
    p.grad = torch.ones(5, dtype=torch.float64)
    opt.step()
    m1 = opt.state[p]["momentum_buffer"].clone()
    p.grad = -torch.ones(5, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.9 * m1 - 1e-8, rtol=1e-12, atol=1e-15)


def test_torque_damping_keeps_momentum_stable_beyond_heavy_balls_step_limit():
    """Momentum weighted by (1 + s)/2, s the smoothed cosine between momentum and gradient: where the iterate
    oscillates across a valley the gradient opposes the momentum and the weight falls towards 0, so TAM stays
    stable at lr h_max = 10, beyond heavy ball's limit 2 (1 + momentum) = 3.8 and beyond it even at half the lr
    (a constant weight of 1/2). Heavy ball at the same lr diverges."""
    assert ill_conditioned_quadratic_loss(lambda ps: steepest.TAM(ps, lr=10.0, momentum=0.9)) < 1e-4  # 1.1e-6
    assert not ill_conditioned_quadratic_loss(lambda ps: torch.optim.SGD(ps, lr=10.0, momentum=0.9)) < 1.0


def test_tam_and_adatam_minimise_a_noisy_quadratic():
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 0, 30, dtype=torch.float64)
    for make in (lambda p: steepest.TAM([p], lr=0.2, momentum=0.9),
                 lambda p: steepest.AdaTAMW([p], lr=2e-3, weight_decay=0.0)):
        p = torch.nn.Parameter(torch.ones(30, dtype=torch.float64))
        opt = make(p)
        start = float(0.5 * (scales * p.detach() ** 2).sum())
        for _ in range(400):
            opt.zero_grad()
            loss = 0.5 * (scales * p**2).sum()
            loss.backward()
            p.grad += 0.01 * torch.randn(30, generator=gen, dtype=torch.float64)
            opt.step()
        assert float(0.5 * (scales * p.detach() ** 2).sum()) < 1e-2 * start


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("cls", [steepest.TAM, steepest.AdaTAM, steepest.AdaTAMW])
def test_gradients_whose_squares_overflow_float32_keep_the_cosine(cls, compile):
    """float32 gradients of ~1e20 (squares beyond float32's range): the cosine is the float64 run's (it is
    scale-free), not inf / inf, and the params stay finite."""
    def run(dtype):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]
        grads = [[torch.randn(s, generator=g, dtype=torch.float64) * 1e20 for s in SHAPES] for _ in range(4)]
        opt = cls(params, lr=1e-3, compile=compile if dtype == torch.float32 else False)
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.to(dtype)
            opt.step()
        return params, [opt.state[p]["s"].item() for p in params]

    params, s32 = run(torch.float32)
    _, s64 = run(torch.float64)
    assert all(torch.isfinite(p).all() for p in params)
    assert s32 == pytest.approx(s64, rel=1e-5)


@pytest.mark.parametrize("cls", [steepest.AdaTAM, steepest.AdaTAMW])
def test_adatam_eager_on_a_tensor_taken_in_pieces_matches_numpy_transcription(cls):
    """Eager, AdaTAM's elementwise tail takes a tensor of 2**21 + 1000 elements in flat pieces (a small tensor
    beside it stays whole): the run equals the transcription."""
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((1 << 21) + 1000), rng.standard_normal(7)]
    kwargs = dict(lr=2e-3, betas=(0.8, 0.99), decay=0.6, weight_decay=0.1)
    got, _, _ = run_torch(lambda ps: cls(ps, compile=False, **kwargs), arrays, steps=4)
    want, _ = numpy_adatam(arrays, steps=4, decoupled=cls is steepest.AdaTAMW, **kwargs)
    close(got, want)
