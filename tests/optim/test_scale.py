"""SCALE against a float64 NumPy transcription of the authors' scale_optimizer.py
(OptimAI-Lab/Minimalist_LLM_Pretraining)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import steepest
from steepest.optim.scale import column_normalize, scale_param_groups

STEPS = 25
# role per param: "main" (column-normalised SGD), "last" (with momentum), "embed" (normalised along dim 0),
# "oned" (AdamW)
SHAPES = [((5, 4), "main"), ((7,), "oned"), ((4, 6), "last"), ((3, 2, 2), "main"), ((9, 3), "embed"), ((1,), "oned")]


def make_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s, _ in SHAPES]


def grad_fn(i, x, t):
    scale = np.linspace(0.5, 2.0 + i, x.size).reshape(x.shape)
    return 2 * scale * (x - 0.3) + 0.3 * np.cos(3 * x) + 0.5 * np.sin(0.7 * t + np.arange(x.size).reshape(x.shape))


def lr_at(lr, t):
    """A schedule (set on every group before step t): the 1D AdamW lr must follow it."""
    return lr * (0.5 + 0.5 * np.cos(np.pi * (t - 1) / (2 * STEPS)))


def authors_scale(arrays, steps=STEPS, lr=1e-3, wd=0.0, momentum=0.9, adam_lr=None, adamw_betas=(0.9, 0.999),
                  adamw_eps=1e-8):
    """scale_optimizer.py SCALE.step, float64 (ndim > 2 viewed as (shape[0], -1))."""
    adam_lr = lr if adam_lr is None else adam_lr
    max_lr = lr
    xs = [a.copy() for a in arrays]
    mom = [np.zeros_like(a) for a in arrays]
    m1 = [np.zeros_like(a) for a in arrays]
    m2 = [np.zeros_like(a) for a in arrays]
    b1, b2 = adamw_betas
    for t in range(1, steps + 1):
        cur = lr_at(lr, t)
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t)
            role = SHAPES[i][1]
            if role == "oned":
                a_lr = (adam_lr / max_lr) * cur
                m1[i] += (1 - b1) * (g - m1[i])
                m2[i] += (1 - b2) * (g * g - m2[i])
                u = m1[i] / (adamw_eps + np.sqrt(m2[i]))
                step_scale = (1 - b1**t) / (1 - b2**t) ** 0.5
                x *= 1 - a_lr * wd
                x -= a_lr / step_scale * u
                continue
            g = g.reshape(x.shape[0], -1)
            if role == "last":
                mom[i] += (1 - momentum) * (g - mom[i])
                g = mom[i]
            col_dim = 0 if role == "embed" else 1
            s = np.maximum(np.sqrt(np.mean(g * g, axis=col_dim, keepdims=True)), 1e-8)
            x *= 1 - cur * wd
            x -= cur * (g / s).reshape(x.shape)
    return xs


def run_torch(arrays, steps=STEPS, **kwargs):
    params = [torch.nn.Parameter(torch.tensor(a)) for a in arrays]
    roles = [r for _, r in SHAPES]
    groups = [{"params": [p for p, r in zip(params, roles) if r in ("main", "oned")]},
              {"params": [p for p, r in zip(params, roles) if r == "last"], "last_layer": True},
              {"params": [p for p, r in zip(params, roles) if r == "embed"], "embedding": True}]
    opt = steepest.SCALE(groups, **kwargs)
    lr = opt.param_groups[0]["lr"]
    for t in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(lr, t)
        for i, p in enumerate(params):
            p.grad = torch.from_numpy(grad_fn(i, p.detach().numpy(), t))
        opt.step()
    return [p.detach().numpy() for p in params]


CASES = [
    dict(),
    dict(lr=1e-2, weight_decay=0.1, momentum=0.8),
    dict(lr=3e-3, adamw_lr=1e-2, adamw_betas=(0.8, 0.99), adamw_eps=1e-6),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_trajectory_matches_authors_transcription(kwargs):
    arrays = make_arrays()
    got = run_torch(arrays, **kwargs)
    ours = dict(kwargs)
    theirs = {("wd" if k == "weight_decay" else "adam_lr" if k == "adamw_lr" else k): v for k, v in ours.items()}
    want = authors_scale(arrays, **theirs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_column_normalize_gives_unit_rms_per_output_unit():
    d = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u = column_normalize(d).reshape(6, 12)
    torch.testing.assert_close(u.square().mean(1), torch.ones(6, dtype=torch.float64))
    v = column_normalize(d.reshape(6, 12), dim=0)
    torch.testing.assert_close(v.square().mean(0), torch.ones(12, dtype=torch.float64))


def test_no_momentum_state_outside_the_last_layer():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 6), torch.nn.LayerNorm(6),
                                torch.nn.Linear(6, 10))
    groups = scale_param_groups(model)
    assert [set(g) & {"last_layer", "embedding"} for g in groups] == [set(), {"embedding"}, {"last_layer"}]
    opt = steepest.SCALE(groups)
    model(torch.randint(0, 10, (4, 3))).sum().backward()
    opt.step()
    assert set(opt.state[model[1].weight]) == {"step"}
    assert set(opt.state[model[3].weight]) == {"step", "momentum_buffer"}
    assert set(opt.state[model[3].bias]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[model[0].weight]) == {"step"}


def test_zero_gradient_gives_no_nan_and_nan_is_skipped():
    params = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(3))]
    opt = steepest.SCALE(params, last_layer=True, skip_nonfinite=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    sd = copy.deepcopy(opt.state_dict())
    before = [p.detach().clone() for p in params]
    params[0].grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert str(opt.state_dict()) == str(sd)


def test_trains_a_small_classifier():
    """Behaviour: SCALE (column-normalised SGD, momentum on the head, AdamW on biases) fits a small MLP."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    y = (x @ torch.randn(10, 3, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = steepest.SCALE(scale_param_groups(model), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: threads only add contention on a shared machine
    try:
        for _ in range(200):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.1
