"""Problems the behaviour tests share: Kronecker-structured least squares (the matrix preconditioners) and a
separable logistic regression (first-order methods)."""

from __future__ import annotations

import math

import torch


def kron_problem(m=24, n=12, cond=100.0, seed=0):
    """min_W ||A W B - C||_F^2 with cond(A) = cond(B) = 100: a Hessian (B B^T) x (A^T A) of condition 1e8 that is a
    Kronecker product, the structure Shampoo's and SOAP's factors model."""
    g = torch.Generator().manual_seed(seed)

    def mat(k):
        U, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
        return (U * torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)) @ V.T

    A, B = mat(m), mat(n)
    C = A @ torch.randn(m, n, generator=g, dtype=torch.float64) @ B
    return A, B, C


def steps_to(make_opt, target, steps):
    """Steps an optimizer built by make_opt([W]) takes from W = 0 to a loss <= target times the initial one, or
    None if it takes more than ``steps``."""
    A, B, C = kron_problem()
    W = torch.nn.Parameter(torch.zeros(A.shape[1], B.shape[0], dtype=torch.float64))
    opt = make_opt([W])
    f0 = float((C**2).sum())
    for t in range(1, steps + 1):
        opt.zero_grad()
        loss = ((A @ W @ B - C) ** 2).sum()
        if float(loss.detach()) <= target * f0:
            return t - 1
        loss.backward()
        opt.step()
    return None


def logistic_regression_loss(make_opt, steps=300, seed=0):
    """The loss after ``steps`` full-batch steps of an optimizer built by make_opt([w]) on a linearly separable
    logistic regression (256 points in 10 dimensions, w from 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g)
    y = (x @ torch.randn(10, generator=g) > 0).float()
    w = torch.nn.Parameter(torch.zeros(10))
    opt = make_opt([w])
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def scaled_layers_loss(make_opt, steps=300, seed=0, scales=(1e3, 1e-1)):
    """The loss after ``steps`` full-batch steps, over the initial one, on two layers whose quadratic losses differ
    in scale by 1e4 (0.5 s ||w - w*||^2 per layer, 16 weights each, w from 0): one learning rate for both moves
    the steep layer out of its stable range or leaves the flat one where it started."""
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(16, generator=g, dtype=torch.float64) for _ in scales]
    ws = [torch.nn.Parameter(torch.zeros(16, dtype=torch.float64)) for _ in scales]
    opt = make_opt(ws)

    def loss():
        return sum(0.5 * s * ((w - t) ** 2).sum() for s, w, t in zip(scales, ws, targets))

    f0 = float(loss().detach())
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return float(loss().detach()) / f0


def spiky_quadratic_loss(make_opt, steps=300, seed=0, every=25, spike=1e4):
    """The loss after ``steps`` steps, over the initial one, on 0.5 ||w - w*||^2 (32 weights, w from 0) whose
    gradient is scaled by ``spike`` at every ``every``-th step (an outlier batch)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(32, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(32, dtype=torch.float64))
    opt = make_opt([w])
    for k in range(1, steps + 1):
        opt.zero_grad()
        w.grad = (w.detach() - target) * (spike if k % every == 0 else 1.0)
        opt.step()
    return float(((w.detach() - target) ** 2).sum() / (target**2).sum())


def bilinear_game_distance(make_opt, steps=1000, seed=0, n=8):
    """Squared distance to the equilibrium (0, 0), over the initial one, after ``steps`` simultaneous steps of
    min_x max_y x^T A y (x descends, y ascends: its gradient is negated), A 8 x 8 Gaussian: gradient
    descent-ascent spirals away from the equilibrium, optimistic steps close in on it."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    x = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
    y = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
    opt = make_opt([x, y])
    d0 = float(x.detach().square().sum() + y.detach().square().sum())
    for _ in range(steps):
        x.grad = (A @ y).detach()
        y.grad = -(A.T @ x).detach()
        opt.step()
    return float(x.detach().square().sum() + y.detach().square().sum()) / d0


def ill_conditioned_quadratic_loss(make_opt, steps=300, seed=0, n=20):
    """The loss after ``steps`` steps, over the initial one, on 0.5 sum_i h_i (w_i - w*_i)^2 with h from 1 down to
    0.01 (w from 0)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.logspace(0, -2, n, dtype=torch.float64)
    target = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = make_opt([w])
    for _ in range(steps):
        w.grad = h * (w.detach() - target)
        opt.step()
    return float((h * (w.detach() - target) ** 2).sum() / (h * target**2).sum())
