"""M-FAC: the inverse-Fisher product equals a dense solve; float64 trajectory vs a dense transcription; behaviour."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steepest.optim.mfac import MFAC, mfac_apply, mfac_coefficients

D = torch.float64
SHAPES = [(6, 5), (7,), (1,), (3, 2, 2)]


def dense_inverse_product(window: torch.Tensor, damp: float, v: torch.Tensor) -> torch.Tensor:
    m, d = window.shape
    fisher = damp * torch.eye(d, dtype=D) + window.t() @ window / m
    return torch.linalg.solve(fisher, v)


@pytest.mark.parametrize("m,d,damp", [(1, 9, 1e-3), (5, 12, 1e-2), (16, 40, 1e-5), (8, 4, 0.3)])
def test_product_equals_dense_solve(m, d, damp):
    g = torch.Generator().manual_seed(m * d)
    window = torch.randn(m, d, generator=g, dtype=D)
    window[m // 2] = 0  # a slot not yet filled
    v = torch.randn(d, generator=g, dtype=D)
    chol = mfac_coefficients(window @ window.t(), damp)
    got = mfac_apply(window, chol, v, damp)
    want = dense_inverse_product(window, damp, v)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=D)) for s in SHAPES]


def grad_fn(ps, t):
    """A smooth non-quadratic loss whose gradient changes with the step (deterministic)."""
    out = []
    for i, p in enumerate(ps):
        scale = torch.linspace(0.5, 2.0 + i, p.numel(), dtype=D).reshape(p.shape)
        out.append(2 * scale * (p - 0.3) + 0.3 * torch.cos(3 * p + 0.1 * t))
    return out


def dense_transcription(params, steps, lr, m, damp, momentum, wd, missing=None):
    """The paper's update with F = damp I + (1/m) sum of the last m gradients' outer products, solved densely."""
    ps = [p.detach().clone() for p in params]
    window = collections.deque([torch.zeros(sum(p.numel() for p in ps), dtype=D)] * m, maxlen=m)
    v = None
    out = []
    for t in range(steps):
        gs = grad_fn(ps, t)
        gs = [g + wd * p for g, p in zip(gs, ps)]
        if missing is not None and t in missing:
            gs[1] = torch.zeros_like(gs[1])
        flat = torch.cat([g.reshape(-1) for g in gs])
        window.append(flat)
        u = dense_inverse_product(torch.stack(list(window)), damp, flat)
        v = u if momentum == 0 else (momentum * v + (1 - momentum) * u if v is not None else (1 - momentum) * u)
        sizes = [p.numel() for p in ps]
        new = []
        for k, (p, piece) in enumerate(zip(ps, v.split(sizes))):
            skip = missing is not None and t in missing and k == 1
            new.append(p if skip else p - lr * piece.reshape(p.shape))
        ps = new
        out.append([p.clone() for p in ps])
    return out


@pytest.mark.parametrize("kw", [dict(lr=0.1, m=4, damp=0.05, momentum=0.0, wd=0.0),
                                dict(lr=0.05, m=6, damp=1e-2, momentum=0.9, wd=1e-2),
                                dict(lr=0.2, m=1, damp=0.5, momentum=0.5, wd=0.0)])
def test_trajectory_matches_dense_transcription(kw):
    params = make_params()
    want = dense_transcription(params, 25, kw["lr"], kw["m"], kw["damp"], kw["momentum"], kw["wd"])
    opt = MFAC(params, lr=kw["lr"], ngrads=kw["m"], damp=kw["damp"], momentum=kw["momentum"], weight_decay=kw["wd"])
    for t in range(25):
        for p, g in zip(params, grad_fn([p.detach() for p in params], t)):
            p.grad = g
        opt.step()
        for a, b in zip(params, want[t]):  # params are O(1): atol 1e-10 is relative to their scale
            torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-10)


def test_param_without_gradient_enters_the_window_as_zero():
    params = make_params()
    missing = {3, 4, 9}
    want = dense_transcription(params, 20, 0.1, 5, 0.05, 0.0, 0.0, missing=missing)
    opt = MFAC(params, lr=0.1, ngrads=5, damp=0.05)
    for t in range(20):
        for p, g in zip(params, grad_fn([p.detach() for p in params], t)):
            p.grad = g
        if t in missing:
            params[1].grad = None
        opt.step()
        for a, b in zip(params, want[t]):  # params are O(1): atol 1e-10 is relative to their scale
            torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-10)


def test_bfloat16_window_recomputes_the_gram_matrix():
    torch.manual_seed(0)  # stochastic rounding of the bf16 window
    a = [p.detach().float().requires_grad_() for p in make_params()]
    b = [p.detach().float().requires_grad_() for p in make_params()]
    oa = MFAC(a, lr=0.05, ngrads=4, damp=0.1, state_dtype=torch.bfloat16)
    ob = MFAC(b, lr=0.05, ngrads=4, damp=0.1)
    assert all("gram" not in oa.state[p] for p in a) or not oa.state
    for t in range(8):
        for ps in (a, b):
            for p, g in zip(ps, grad_fn([p.detach() for p in ps], t)):
                p.grad = g.to(p.dtype)
        oa.step()
        ob.step()
    assert all("gram" not in oa.state[p] and oa.state[p]["window"].dtype == torch.bfloat16 for p in a)
    for x, y in zip(a, b):  # bf16 rounding (~4e-3 relative) of the window, amplified by the Fisher inverse
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0.1, atol=0.1)


def test_rank_one_and_zero_gradients_stay_finite():
    params = make_params()
    opt = MFAC(params, lr=0.1, ngrads=3, damp=1e-8)
    for t in range(6):
        for p in params:
            p.grad = torch.zeros_like(p) if t < 2 else torch.ones_like(p)  # zero, then the same gradient again
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.parametrize("bad", [dict(ngrads=0), dict(ngrads=2.5), dict(damp=0.0), dict(damp=-1e-3),
                                 dict(momentum=1.0), dict(lr=float("nan"))])
def test_bad_hyperparameters_raise(bad):
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        MFAC(make_params(), **bad)


def test_behaviour_reaches_adamw_loss_in_fewer_steps():
    """AdamW (lr 1e-2, 100 full-batch steps) vs M-FAC on a 10-32-4 tanh MLP; M-FAC needs ~11 steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    w = torch.randn(10, 4, generator=g)
    y = (torch.tanh(x @ w) + 0.1 * torch.randn(256, 4, generator=g)).argmax(1)

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))

    model = mlp()
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        adam.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adam.step()
    target = F.cross_entropy(model(x), y).item()
    model = mlp()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=32, damp=1e-3, momentum=0.9)
    steps = 0
    while steps < 50 and F.cross_entropy(model(x), y).item() > target:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        steps += 1
    assert F.cross_entropy(model(x), y).item() <= target, "M-FAC did not reach AdamW's 100-step loss in 50 steps"
    assert steps <= 25, f"M-FAC needed {steps} steps"
