"""NovoGrad against a float64 NumPy transcription of the paper's Algorithm 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import steepest

from .problems import logistic_regression_loss, scaled_layers_loss
from .trajectory import step_alike

SHAPES = [(5, 4), (7,), (1,), (3, 2, 2)]


def grad_fn(x: np.ndarray, i: int) -> np.ndarray:
    scale = np.linspace(0.5, 2.0 + i, x.size).reshape(x.shape)
    return 2 * scale * (x - 0.3) + 0.3 * np.cos(3 * x)


def init(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in SHAPES]


def novograd_oracle(xs, steps, lr, betas, eps, wd, grad_averaging):
    """Algorithm 1: v_1 = ||g_1||^2, v_t = b2 v + (1-b2) ||g_t||^2 (one number per layer);
    m_t = b1 m + c (g / sqrt(v + eps) + wd w); w <- w - lr m_t, c = 1 - b1 with grad averaging, else 1."""
    b1, b2 = betas
    c = 1 - b1 if grad_averaging else 1.0
    xs = [x.copy() for x in xs]
    m = [np.zeros_like(x) for x in xs]
    v = [None] * len(xs)
    for _ in range(steps):
        for i, x in enumerate(xs):
            g = grad_fn(x, i)
            sq = float(np.sum(g * g))
            v[i] = sq if v[i] is None else b2 * v[i] + (1 - b2) * sq
            m[i] = b1 * m[i] + c * (g / np.sqrt(v[i] + eps) + wd * x)
            xs[i] = x - lr * m[i]
    return xs


def run_steepest(xs, steps, **kw):
    params = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in xs]
    opt = steepest.NovoGrad(params, **kw)
    for _ in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.from_numpy(grad_fn(p.detach().numpy(), i))
        opt.step()
    return [p.detach().numpy() for p in params], opt


@pytest.mark.parametrize("grad_averaging", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_matches_paper_algorithm_float64(grad_averaging, wd):
    kw = dict(lr=0.02, betas=(0.95, 0.98), eps=1e-8, weight_decay=wd, grad_averaging=grad_averaging)
    xs = init()
    want = novograd_oracle(xs, 30, kw["lr"], kw["betas"], kw["eps"], wd, grad_averaging)
    got, _ = run_steepest(xs, 30, **kw)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_compiled_path_matches_oracle():
    kw = dict(lr=0.02, betas=(0.95, 0.98), eps=1e-8, weight_decay=0.05, grad_averaging=True)
    xs = init()
    want = novograd_oracle(xs, 5, kw["lr"], kw["betas"], kw["eps"], 0.05, True)
    got, _ = run_steepest(xs, 5, compile=True, **kw)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_second_moment_is_one_number_per_tensor():
    xs = init()
    _, opt = run_steepest(xs, 1, lr=0.01)
    for i, p in enumerate(opt.param_groups[0]["params"]):
        v = opt.state[p]["exp_avg_sq"]
        assert v.numel() == 1
        g = grad_fn(xs[i], i)
        np.testing.assert_allclose(v.item(), np.sum(g * g), rtol=1e-14)


def test_invariant_to_gradient_scale():
    """Layer-wise normalisation: multiplying every gradient of a layer by 1000 changes nothing (no wd)."""
    xs = init()
    params = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in xs]
    scaled = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in xs]
    o1, o2 = steepest.NovoGrad(params, lr=0.02, eps=1e-30), steepest.NovoGrad(scaled, lr=0.02, eps=1e-30)
    for _ in range(10):
        for i, (p, q) in enumerate(zip(params, scaled)):
            p.grad = torch.from_numpy(grad_fn(p.detach().numpy(), i))
            q.grad = torch.from_numpy(grad_fn(q.detach().numpy(), i)) * 1000.0
        o1.step()
        o2.step()
    for p, q in zip(params, scaled):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_reaches_target_on_logistic_regression():
    assert logistic_regression_loss(lambda ps: steepest.NovoGrad(ps, lr=0.05, betas=(0.9, 0.98))) < 0.1


def test_layerwise_normalisation_takes_layers_of_very_different_scales_at_one_lr():
    """The paper's point: each layer's gradient is divided by its own norm, so one lr serves layers whose gradients
    differ by orders of magnitude. Momentum SGD at the same lr diverges on the steep layer."""
    assert scaled_layers_loss(lambda ps: steepest.NovoGrad(ps, lr=0.05)) < 1e-6  # measured 1.7e-8
    assert not scaled_layers_loss(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.95)) < 1.0


def test_layer_second_moment_stays_in_the_working_dtype_under_bfloat16_states():
    """state_dtype=bfloat16 stores the momentum in bfloat16; the one number per tensor v stays float32 (its rounding
    would scale the whole tensor's step), and the step follows the float32-state run closely."""
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(2)]
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opts = [steepest.NovoGrad(ref, lr=1e-2), steepest.NovoGrad(params, lr=1e-2, state_dtype=torch.bfloat16)]
    step_alike(ref, params, opts, 5)
    state = opts[1].state[params[0]]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.float32
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


@pytest.mark.parametrize("compile", [False, True])
def test_nonfinite_gradient_reaches_only_its_own_tensor(compile):
    """A NaN entry in one tensor's gradient makes that tensor's norm, factor and step NaN, and leaves the other
    tensors' steps as they would be without it (skip_nonfinite off); a negative v loaded from a state dict gives
    a NaN factor too, not an error."""
    torch.manual_seed(0)
    clean = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(3)]
    dirty = [torch.nn.Parameter(p.detach().clone()) for p in clean]
    o1 = steepest.NovoGrad(clean, lr=0.01, compile=compile)
    o2 = steepest.NovoGrad(dirty, lr=0.01, compile=compile)
    for p, q in zip(clean, dirty):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    dirty[1].grad[3, 5] = float("nan")
    o1.step()
    o2.step()
    assert torch.isnan(dirty[1]).all() and torch.isnan(o2.state[dirty[1]]["exp_avg_sq"]).all()
    for i in (0, 2):
        torch.testing.assert_close(dirty[i], clean[i], rtol=0, atol=0)
    o1.state[clean[0]]["exp_avg_sq"].fill_(-1e9)  # b2 v + (1 - b2) ||g||^2 stays negative
    o1.step()
    assert torch.isnan(clean[0]).all() and torch.isfinite(clean[2]).all()
