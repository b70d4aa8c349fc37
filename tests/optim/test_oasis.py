"""OASIS: trajectory vs a NumPy transcription of Algorithm 1 (separable problems: Hutchinson is exact there);
logistic regression behaviour; maximize, param groups and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steepest.optim.oasis import OASIS

D = torch.float64
SHAPES = [(3, 4), (5,)]


def separable(seed, s_amp):
    """f(w) = sum h/2 (w - c)^2 + s cos(w) per coordinate: a diagonal Hessian h - s cos(w) (s = 0: a quadratic)."""
    rng = np.random.default_rng(seed)
    hs = [rng.uniform(0.3, 4.0, size=s) for s in SHAPES]
    cs = [rng.normal(size=s) for s in SHAPES]
    ss = [s_amp * rng.uniform(0.5, 1.0, size=s) for s in SHAPES]
    w0 = [rng.normal(size=s) for s in SHAPES]
    return hs, cs, ss, w0


def numpy_oasis(hs, cs, ss, w0, steps, lr, beta2, alpha, adaptive):
    """Algorithm 1 of the paper, transcribed in NumPy (float64); returns iterates, step sizes and diagnostics."""
    w = [x.copy() for x in w0]
    Dk = None
    eta = theta = None
    prev_w = prev_g = None
    traj, etas, first_bound, floored = [], [], [], 0
    for k in range(steps):
        g = [h * (x - c) - s * np.sin(x) for h, c, s, x in zip(hs, cs, ss, w)]
        v = [h - s * np.cos(x) for h, s, x in zip(hs, ss, w)]  # z * (H z) with H diagonal, for any z in {-1, 1}
        Dk = v if k == 0 else [beta2 * d + (1 - beta2) * vi for d, vi in zip(Dk, v)]
        Dh = [np.maximum(np.abs(d), alpha) for d in Dk]
        floored += sum(int((np.abs(d) < alpha).sum()) for d in Dk)
        if not adaptive:
            eta_k = lr
        elif k == 0:
            eta_k, theta = lr, math.inf
        else:
            num = sum(float(((x - px) ** 2 * d).sum()) for x, px, d in zip(w, prev_w, Dh))
            den = sum(float(((gi - pg) ** 2 / d).sum()) for gi, pg, d in zip(g, prev_g, Dh))
            b1 = math.inf if math.isinf(theta) else math.sqrt(1 + theta) * eta
            b2 = 0.5 * math.sqrt(num / den)
            eta_k = min(b1, b2)
            first_bound.append(b1 < b2)
            theta = eta_k / eta
        eta = eta_k
        prev_w, prev_g = w, g
        w = [x - eta * gi / d for x, gi, d in zip(w, g, Dh)]
        traj.append(w)
        etas.append(eta)
    return traj, etas, first_bound, floored


def torch_loss(params, hs, cs, ss):
    total = 0.0
    for p, h, c, s in zip(params, hs, cs, ss):
        h, c, s = (torch.as_tensor(a, dtype=p.dtype) for a in (h, c, s))
        total = total + (h / 2 * (p - c) ** 2 + s * torch.cos(p)).sum()
    return total


def closure_for(opt, loss_fn):
    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward(create_graph=True)
        return loss
    return closure


@pytest.mark.parametrize("s_amp,adaptive", [(0.0, True), (0.8, True), (0.8, False)])
def test_trajectory_matches_numpy_transcription(s_amp, adaptive):
    hs, cs, ss, w0 = separable(0, s_amp)
    kw = dict(lr=0.05 if adaptive else 0.7, beta2=0.9, alpha=0.25)
    want, etas, first_bound, floored = numpy_oasis(hs, cs, ss, w0, 25, adaptive=adaptive, **kw)
    params = [torch.nn.Parameter(torch.tensor(x, dtype=D)) for x in w0]
    opt = OASIS(params, seed=3, adaptive=adaptive, **kw)
    closure = closure_for(opt, lambda: torch_loss(params, hs, cs, ss))
    worst = 0.0
    for t in range(25):
        opt.step(closure)
        for p, x in zip(params, want[t]):
            np.testing.assert_allclose(p.detach().numpy(), x, rtol=1e-10, atol=1e-12)
            worst = max(worst, float(np.max(np.abs(p.detach().numpy() - x) / np.maximum(np.abs(x), 1e-12))))
        if adaptive:
            assert opt.param_groups[0]["eta"] == pytest.approx(etas[t], rel=1e-10)
    assert worst < 1e-10
    if s_amp and adaptive:  # the run exercises truncation and both bounds of the step-size rule
        assert floored > 0 and any(first_bound) and not all(first_bound)


def test_quadratic_settles_at_half_newton_step():
    """With an exact diagonal Hessian the smoothness bound is 1/2: eta grows from eta_0 to 0.5 and stays."""
    hs, cs, ss, w0 = separable(1, 0.0)
    params = [torch.nn.Parameter(torch.tensor(x, dtype=D)) for x in w0]
    opt = OASIS(params, lr=1e-3, alpha=1e-8)
    closure = closure_for(opt, lambda: torch_loss(params, hs, cs, ss))
    for _ in range(40):
        opt.step(closure)
    assert opt.param_groups[0]["eta"] == pytest.approx(0.5, rel=1e-12)
    for p, c in zip(params, cs):
        np.testing.assert_allclose(p.detach().numpy(), c, atol=1e-8)


# --------------------------------------------------------------------------------------------- behaviour
def logistic_problem():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 20
    scales = torch.logspace(-1, 1, d, dtype=D)  # ill-conditioned features: curvature spans 4 orders
    x = torch.randn(n, d, generator=g, dtype=D) * scales
    w_true = torch.randn(d, generator=g, dtype=D) / scales
    y = torch.where(x @ w_true + 0.5 * torch.randn(n, generator=g, dtype=D) > 0, 1.0, -1.0).to(D)
    lam = 1e-3

    def loss(w):
        return torch.nn.functional.softplus(-y * (x @ w)).mean() + lam / 2 * (w @ w)

    w = torch.zeros(d, dtype=D)
    for _ in range(30):  # Newton's method for the optimum
        hess = torch.autograd.functional.hessian(loss, w)
        grad = torch.autograd.functional.jacobian(loss, w)
        w = w - torch.linalg.solve(hess, grad)
    return loss, float(loss(w))


def run_logistic(make_opt, steps, closure_graph=True):
    loss_fn, f_star = logistic_problem()
    w = torch.nn.Parameter(torch.zeros(20, dtype=D))
    opt = make_opt([w])

    def closure():
        opt.zero_grad()
        loss = loss_fn(w)
        loss.backward(create_graph=closure_graph)
        return loss
    for _ in range(steps):
        opt.step(closure)
    with torch.no_grad():
        return float(loss_fn(w)) - f_star


def test_logistic_regression_converges_without_tuning():
    # Measured gaps f - f* after 50 full-batch steps with default hyperparameters: OASIS 9e-9 (0 to machine
    # precision by 100 steps); Adam(lr 0.1) 9e-3; GD(lr 0.05, near its stability limit here) 0.21.
    oasis = run_logistic(lambda ps: OASIS(ps), 50)
    adam = run_logistic(lambda ps: torch.optim.Adam(ps, lr=0.1), 50, closure_graph=False)
    gd = run_logistic(lambda ps: torch.optim.SGD(ps, lr=0.05), 50, closure_graph=False)
    assert oasis < 1e-7, oasis
    assert adam > 1e-3 and gd > 1e-2, (adam, gd)


# ------------------------------------------------------------------------------------- engine and inputs
def test_maximize_equals_minimizing_the_negated_loss():
    hs, cs, ss, w0 = separable(2, 0.8)
    a = [torch.nn.Parameter(torch.tensor(x, dtype=D)) for x in w0]
    b = [torch.nn.Parameter(torch.tensor(x, dtype=D)) for x in w0]
    oa = OASIS(a, lr=0.05, alpha=0.1, maximize=True)
    ob = OASIS(b, lr=0.05, alpha=0.1)
    ca = closure_for(oa, lambda: -torch_loss(a, hs, cs, ss))
    cb = closure_for(ob, lambda: torch_loss(b, hs, cs, ss))
    for _ in range(8):
        oa.step(ca)
        ob.step(cb)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)


def test_param_groups_run_their_own_step_size():
    hs, cs, ss, w0 = separable(3, 0.8)
    a = [torch.nn.Parameter(torch.tensor(x, dtype=D)) for x in w0]
    b = [torch.nn.Parameter(torch.tensor(x, dtype=D)) for x in w0]
    opt = OASIS([{"params": a[:1]}, {"params": a[1:], "lr": 0.01}], lr=0.05, alpha=0.1)
    o1, o2 = OASIS(b[:1], lr=0.05, alpha=0.1), OASIS(b[1:], lr=0.01, alpha=0.1)
    c = closure_for(opt, lambda: torch_loss(a, hs, cs, ss))
    c1 = closure_for(o1, lambda: torch_loss(b[:1], hs[:1], cs[:1], ss[:1]))
    c2 = closure_for(o2, lambda: torch_loss(b[1:], hs[1:], cs[1:], ss[1:]))
    for _ in range(6):
        opt.step(c)
        o1.step(c1)
        o2.step(c2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)
    assert opt.param_groups[1]["eta"] == o2.param_groups[0]["eta"]


def test_bad_inputs():
    p = torch.nn.Parameter(torch.ones(3, dtype=D))
    with pytest.raises(ValueError, match="alpha"):
        OASIS([p], alpha=0.0)
    with pytest.raises(ValueError, match="beta2"):
        OASIS([p], beta2=1.0)
    opt = OASIS([p])
    with pytest.raises(ValueError, match="closure"):
        opt.step()

    def no_graph():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match="create_graph"):
        opt.step(no_graph)
