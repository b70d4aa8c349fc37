"""AdamP and SGDP against the authors' package (adamp on PyPI) and a float64 NumPy transcription."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import steepest

adamp = pytest.importorskip("adamp")

# A per-channel scale-invariant matrix, a layer-wise scale-invariant 4-d tensor, a plain matrix, a bias.
SHAPES = [(6, 4), (3, 2, 2, 2), (4, 5), (5,)]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SHAPES]


def loss_fn(params, t):
    w_rows, w_layer, w_plain, b = params
    target = torch.linspace(-1, 1, w_rows.shape[1], dtype=torch.float64) * (1 + 0.1 * t)
    rows = w_rows / w_rows.norm(dim=1, keepdim=True)          # invariant to scaling any row
    layer = w_layer / w_layer.norm()                            # invariant to scaling the whole tensor
    return (((rows - target) ** 2).sum() + torch.sin(3 * layer).sum() + ((w_plain - 0.3) ** 2).sum()
            + 0.1 * torch.cos(w_plain).sum() + ((b - 0.5) ** 2).sum())


def set_grads(params, t):
    for p in params:
        p.grad = None
    loss_fn(params, t).backward()


def run(make_opt, steps=25, seed=0):
    params = make_params(seed)
    opt = make_opt(params)
    for t in range(steps):
        set_grads(params, t)
        opt.step()
    return [p.detach().clone() for p in params], opt


ADAMP_CASES = [dict(lr=0.05, weight_decay=0.1), dict(lr=0.02, weight_decay=0.3, nesterov=True, betas=(0.8, 0.99)),
               dict(lr=0.05, weight_decay=0.0, delta=0.2, wd_ratio=0.5)]
SGDP_CASES = [dict(lr=0.05, momentum=0.9, weight_decay=0.1),
              dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
              dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=0.05), dict(lr=0.1)]


@pytest.mark.parametrize("kw", ADAMP_CASES)
def test_adamp_matches_package_float64(kw):
    got, _ = run(lambda p: steepest.AdamP(p, **kw))
    want, _ = run(lambda p: adamp.AdamP(p, **kw))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kw", SGDP_CASES)
def test_sgdp_matches_package_float64(kw):
    got, _ = run(lambda p: steepest.SGDP(p, **kw))
    want, _ = run(lambda p: adamp.SGDP(p, **kw))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_compiled_path_matches_package():
    kw = ADAMP_CASES[0]
    got, _ = run(lambda p: steepest.AdamP(p, compile=True, **kw), steps=6)
    want, _ = run(lambda p: adamp.AdamP(p, **kw), steps=6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------------------- NumPy transcription
def _project_np(p, g, u, delta, wd_ratio, eps):
    """Algorithm 1 of the paper with the package's channel-then-layer order; returns (u, wd ratio)."""
    if p.ndim <= 1:
        return u, 1.0
    for rows in (p.shape[0], 1):
        pv, gv = p.reshape(rows, -1), g.reshape(rows, -1)
        cos = np.abs((pv * gv).sum(1) / np.maximum(np.linalg.norm(pv, axis=1) * np.linalg.norm(gv, axis=1), eps))
        if cos.max() < delta / math.sqrt(pv.shape[1]):
            p_n = pv / (np.linalg.norm(pv, axis=1, keepdims=True) + eps)
            uv = u.reshape(rows, -1)
            uv = uv - p_n * (p_n * uv).sum(1, keepdims=True)
            return uv.reshape(p.shape), wd_ratio
    return u, 1.0


def adamp_oracle(steps, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1):
    xs = [torch.nn.Parameter(p.detach().clone()) for p in make_params()]
    b1, b2 = betas
    m = [np.zeros(tuple(p.shape)) for p in xs]
    v = [np.zeros(tuple(p.shape)) for p in xs]
    projected = 0
    for t in range(1, steps + 1):
        set_grads(xs, t - 1)
        for i, p in enumerate(xs):
            x, g = p.detach().numpy(), p.grad.numpy()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = m[i] / (np.sqrt(v[i]) / math.sqrt(1 - b2**t) + eps)
            u, r = _project_np(x, g, u, delta, wd_ratio, eps)
            projected += r != 1.0
            new = x * (1 - lr * weight_decay * r) - lr / (1 - b1**t) * u
            with torch.no_grad():
                p.copy_(torch.from_numpy(new))
    return [p.detach() for p in xs], projected


def test_adamp_matches_numpy_transcription():
    want, projected = adamp_oracle(25, lr=0.05, weight_decay=0.1)
    assert projected >= 25, "the problem must exercise the projection"
    got, _ = run(lambda p: steepest.AdamP(p, lr=0.05, weight_decay=0.1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_projection_keeps_scale_invariant_weights_from_growing():
    """The paper's point: plain Adam grows the norm of scale-invariant weights; AdamP barely does."""
    adam, _ = run(lambda p: steepest.Adam(p, lr=0.1), steps=60)
    proj, _ = run(lambda p: steepest.AdamP(p, lr=0.1), steps=60)
    start = make_params()
    growth_adam = adam[0].norm() / start[0].norm()
    growth_adamp = proj[0].norm() / start[0].norm()
    assert growth_adamp < 1.1 and growth_adam > 1.5  # measured: 1.06 and 1.89


def test_sgdp_reaches_target():
    """From a loss of 58.7, SGDP with momentum reaches the neighbourhood of the minimum (about -10.44)."""
    params, _ = run(lambda p: steepest.SGDP(p, lr=0.05, momentum=0.9), steps=200)
    assert loss_fn(params, 0).item() < -10.0


def test_adamp_fused_on_a_large_matrix_uses_its_own_kernel_and_equals_eager():
    """A matrix of 2**23+ elements steps through a kernel compiled for large tensors (the direction recomputed, not
    stored); its steps equal the eager ones, which follow the package (float64)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 4097, generator=g, dtype=torch.float64) * 0.02
    runs = []
    for compile in (True, False):
        p = torch.nn.Parameter(w.clone())
        opt = steepest.AdamP([p], lr=1e-2, weight_decay=1e-2, compile=compile)
        for t in range(3):
            p.grad = torch.sin(w * (t + 3)) * 1e-2 + 1e-3 * p.detach()
            opt.step()
        runs.append((p.detach(), opt))
    (fused, opt), (eager, _) = runs
    assert any("large" in key for key in opt._kernels) and all(k is not None for k in opt._kernels.values())
    torch.testing.assert_close(fused, eager, rtol=1e-12, atol=1e-14)
