"""XGrad weight prediction against float64 NumPy transcriptions of the paper's prediction equations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import steepest

SHAPES = [(5, 4), (7,), (3, 2, 2)]
STEPS = 25


def make_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in SHAPES]


def _disturbance(x, t):
    return 0.5 * np.sin(0.7 * t + np.arange(x.size).reshape(x.shape))


def grad_fn(i, x, t):
    """Gradient of loss_torch below (its step-dependent linear term makes the gradients change sign)."""
    scale = np.linspace(0.5, 2.0 + i, x.size).reshape(x.shape)
    return 2 * scale * (x - 0.3) + 0.3 * np.cos(3 * x) + _disturbance(x, t)


def loss_torch(params, t):
    total = 0.0
    for i, x in enumerate(params):
        scale = torch.linspace(0.5, 2.0 + i, x.numel(), dtype=x.dtype).reshape(x.shape)
        lin = torch.from_numpy(_disturbance(np.zeros(x.shape), t))
        total = total + (scale * (x - 0.3) ** 2).sum() + 0.1 * torch.sin(3 * x).sum() + (lin * x).sum()
    return total


def run_torch(make_opt, arrays, steps=STEPS):
    params = [torch.nn.Parameter(torch.tensor(a, dtype=torch.float64)) for a in arrays]
    opt = make_opt(params)
    losses = []
    for t in range(1, steps + 1):
        def closure(t=t):
            opt.zero_grad()
            loss = loss_torch(params, t)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    return [p.detach().numpy() for p in params], losses


def numpy_xgrad_adam(arrays, steps=STEPS, s=1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                     decoupled=True, amsgrad=False):
    """XGrad on Adam/AdamW (arXiv 2305.18240): x_hat = x_t - s lr Delta_t with the current moments,
    Delta = m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) (+ wd x_t for AdamW); g = grad(x_hat); Adam(W) step at x_t.
    With amsgrad, v in both is the running maximum of v (torch.optim.Adam's amsgrad)."""
    b1, b2 = betas
    xs = [a.copy() for a in arrays]
    m = [np.zeros_like(a) for a in arrays]
    v = [np.zeros_like(a) for a in arrays]
    vmax = [np.zeros_like(a) for a in arrays]
    second = vmax if amsgrad else v
    losses = []
    for t in range(1, steps + 1):
        hats = []
        for i, x in enumerate(xs):
            if t == 1:
                hats.append(x.copy())
                continue
            k = t - 1  # the optimizer's step count so far
            delta = m[i] / (1 - b1**k) / (np.sqrt(second[i]) / math.sqrt(1 - b2**k) + eps)
            if decoupled:
                delta = delta + weight_decay * x
            hats.append(x - s * lr * delta)
        losses.append(sum(_loss_np(i, h, t) for i, h in enumerate(hats)))
        for i, x in enumerate(xs):
            g = grad_fn(i, hats[i], t)
            if decoupled:
                x *= 1 - lr * weight_decay
            else:
                g = g + weight_decay * x
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            vmax[i] = np.maximum(vmax[i], v[i])
            x -= lr / (1 - b1**t) * m[i] / (np.sqrt(second[i]) / math.sqrt(1 - b2**t) + eps)
    return xs, losses


def numpy_xgrad_sgd(arrays, steps=STEPS, s=1, lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0):
    """XGrad on SGD with momentum: x_hat = x_t - s lr b_t; b_{t+1} = mu b_t + (1-dampening) g (b_1 = g_1,
    as torch.optim.SGD), with g = grad(x_hat) + wd x_t; x_{t+1} = x_t - lr b_{t+1}."""
    xs = [a.copy() for a in arrays]
    b = [None for _ in arrays]
    losses = []
    for t in range(1, steps + 1):
        hats = [x.copy() if b[i] is None else x - s * lr * b[i] for i, x in enumerate(xs)]
        losses.append(sum(_loss_np(i, h, t) for i, h in enumerate(hats)))
        for i, x in enumerate(xs):
            g = grad_fn(i, hats[i], t) + weight_decay * x
            b[i] = g.copy() if b[i] is None else momentum * b[i] + (1 - dampening) * g
            x -= lr * b[i]
    return xs, losses


def _loss_np(i, x, t):
    scale = np.linspace(0.5, 2.0 + i, x.size).reshape(x.shape)
    return float(np.sum(scale * (x - 0.3) ** 2) + 0.1 * np.sum(np.sin(3 * x)) + np.sum(_disturbance(x, t) * x))


def close(got, want, rtol=1e-10):
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("base,kwargs", [
    ("adamw", dict(lr=1e-2)),
    ("adamw", dict(lr=2e-2, betas=(0.8, 0.99), weight_decay=0.1, steps_ahead=2)),
    ("adam", dict(lr=2e-2, eps=1e-3)),
    ("adam", dict(lr=2e-2, weight_decay=0.05, steps_ahead=3)),
    # A short memory of g^2 (b2 0.6) lets v fall below its running maximum: amsgrad's prediction differs.
    ("adamw", dict(lr=2e-2, betas=(0.8, 0.6), weight_decay=0.05, amsgrad=True)),
    ("adam", dict(lr=2e-2, betas=(0.9, 0.6), amsgrad=True, steps_ahead=2)),
    # torch.optim.Adam's switch: the decay and the prediction are AdamW's.
    ("adam", dict(lr=2e-2, weight_decay=0.05, decoupled_weight_decay=True, steps_ahead=2)),
])
def test_xgrad_adam_matches_numpy_transcription(base, kwargs):
    arrays = make_arrays()
    got, losses = run_torch(lambda ps: steepest.XGrad(ps, base=base, **kwargs), arrays)
    oracle = {k: v for k, v in kwargs.items() if k not in ("steps_ahead", "decoupled_weight_decay")}
    oracle.setdefault("weight_decay", 1e-2 if base == "adamw" else 0.0)  # the base's defaults (torch.optim's)
    decoupled = base == "adamw" or kwargs.get("decoupled_weight_decay", False)
    want, want_losses = numpy_xgrad_adam(arrays, s=kwargs.get("steps_ahead", 1), decoupled=decoupled, **oracle)
    close(got, want)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-10)


@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2, momentum=0.9),
    dict(lr=2e-2, momentum=0.8, dampening=0.1, weight_decay=0.05, steps_ahead=2),
])
def test_xgrad_sgd_matches_numpy_transcription(kwargs):
    arrays = make_arrays(1)
    got, losses = run_torch(lambda ps: steepest.XGrad(ps, base="sgd", **kwargs), arrays)
    oracle = {k: v for k, v in kwargs.items() if k != "steps_ahead"}
    want, want_losses = numpy_xgrad_sgd(arrays, s=kwargs.get("steps_ahead", 1), **oracle)
    close(got, want)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-10)


@pytest.mark.parametrize("base,cls,kwargs", [
    ("adamw", steepest.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    ("adam", steepest.Adam, dict(lr=1e-2, amsgrad=True)),
    ("sgd", steepest.SGD, dict(lr=1e-2, momentum=0.9)),
])
def test_zero_steps_ahead_is_the_base_optimizer(base, cls, kwargs):
    arrays = make_arrays(2)
    got, _ = run_torch(lambda ps: steepest.XGrad(ps, base=base, steps_ahead=0, **kwargs), arrays)
    want, _ = run_torch(lambda ps: cls(ps, **kwargs), arrays)
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


def test_instances_are_the_base_optimizer_with_prediction():
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = steepest.XGrad(p, base="adamw", lr=1e-3)
    assert isinstance(opt, steepest.XGrad) and isinstance(opt, steepest.AdamW)
    assert type(opt).__name__ == "XGradAdamW" and opt.param_groups[0]["steps_ahead"] == 1
    assert isinstance(steepest.XGrad(p, base="SGD", momentum=0.9), steepest.SGD)
    with pytest.raises(ValueError, match="base"):
        steepest.XGrad(p, base="lion")
    with pytest.raises(ValueError, match="momentum"):
        steepest.XGrad(p, base="sgd", momentum=0.0)
    with pytest.raises(ValueError, match="steps_ahead"):
        steepest.XGrad(p, steps_ahead=-1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_closure_runs_at_predicted_weights_which_are_then_restored_exactly():
    arrays = make_arrays(3)
    params = [torch.nn.Parameter(torch.tensor(a, dtype=torch.float64)) for a in arrays]
    opt = steepest.XGrad(params, base="adamw", lr=1e-2, skip_nonfinite=True)
    seen = []

    def closure(poison=False):
        opt.zero_grad()
        seen.append([p.detach().clone() for p in params])
        loss = loss_torch(params, 1)
        loss.backward()
        if poison:
            params[0].grad[0, 0] = float("nan")
        return loss

    opt.step(closure)
    assert all(torch.equal(a, torch.from_numpy(b)) for a, b in zip(seen[0], arrays))  # no state yet: x_hat = x
    before = [p.detach().clone() for p in params]
    opt.step(lambda: closure(poison=True))  # the step is skipped; the prediction must still be undone
    assert opt.skipped_steps == 1
    assert not any(torch.equal(a, b) for a, b in zip(seen[1], before))
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_xgrad_minimises_a_quadratic_at_least_as_well_as_its_base():
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 0, 30, dtype=torch.float64)
    target = torch.randn(30, generator=gen, dtype=torch.float64)
    finals = {}
    for name, make in (("xgrad", lambda p: steepest.XGrad([p], base="adamw", lr=0.05)),
                       ("adamw", lambda p: steepest.AdamW([p], lr=0.05))):
        p = torch.nn.Parameter(torch.zeros(30, dtype=torch.float64))
        opt = make(p)

        def closure(p=p, opt=opt):
            opt.zero_grad()
            loss = 0.5 * (scales * (p - target) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(300):
            opt.step(closure)
        finals[name] = float(0.5 * (scales * (p.detach() - target) ** 2).sum())
    start = float(0.5 * (scales * target**2).sum())
    assert finals["xgrad"] < 1e-3 * start
    assert finals["xgrad"] < 2 * finals["adamw"]
