"""DoG / LDoG: float64 trajectories equal a NumPy transcription of the paper's algorithm and the authors'
code (carmonlab/dog 1.0.2: rbar_0 = reps_rel (1 + ||x_0||), G_0 = ||g_0||^2 + eps); behaviour."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from steepest.optim.dog import DoG, LDoG

from .trajectory import step_alike

SHAPES = [(6, 5), (7,), (1,), (3, 2, 2)]
STEPS = 30


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SHAPES]


def scale(i, shape):
    return np.linspace(0.5, 2.0 + i, int(np.prod(shape))).reshape(shape)


def set_grads(params, t):
    for i, p in enumerate(params):
        s = torch.from_numpy(scale(i, tuple(p.shape)))
        p.grad = (2 * s * (p.detach() - 0.3) + 0.3 * torch.cos(3 * p.detach() + 0.1 * t)).clone()


def numpy_grads(xs, t):
    return [2 * scale(i, x.shape) * (x - 0.3) + 0.3 * np.cos(3 * x + 0.1 * t) for i, x in enumerate(xs)]


def dog_numpy(xs, steps, blocks, lr=1.0, reps_rel=1e-6, weight_decay=0.0, eps=1e-8, init_eta=None):
    """The DoG recursion over blocks of tensors (one block per group for DoG, per tensor for LDoG).

    eta_t = lr rbar_t / sqrt(G_t), rbar_t = max(reps_rel (1 + ||x_0||), max_{i<=t} ||x_i - x_0||),
    G_t = eps + sum_{i<=t} ||g_i||^2, x_{t+1} = x_t - eta_t g_t, with g = grad + weight_decay x.
    """
    xs = [x.copy() for x in xs]
    x0 = [x.copy() for x in xs]
    if init_eta is not None:
        reps_rel = 0.0
    rbar, G = {}, {}
    out = []
    for t in range(steps):
        gs = [g + weight_decay * x for g, x in zip(numpy_grads(xs, t), xs)]
        for bi, block in enumerate(blocks):
            g_sq = sum(float(np.sum(gs[i] ** 2)) for i in block)
            if t == 0:
                rbar[bi] = reps_rel * (1 + np.sqrt(sum(float(np.sum(x0[i] ** 2)) for i in block)))
                G[bi] = g_sq + eps
            else:
                dist = np.sqrt(sum(float(np.sum((xs[i] - x0[i]) ** 2)) for i in block))
                rbar[bi] = max(rbar[bi], dist)
                G[bi] += g_sq
            eta = lr * rbar[bi] / np.sqrt(G[bi])
            if t == 0 and init_eta is not None:
                eta = init_eta
            for i in block:
                xs[i] = xs[i] - eta * gs[i]
        out.append([x.copy() for x in xs])
    return out


CASES = [
    dict(),
    dict(lr=0.5),
    dict(weight_decay=0.1),
    dict(init_eta=1e-3),
    dict(reps_rel=1e-4, eps=1e-4),
]


def _id(k):
    return ",".join(f"{a}={v}" for a, v in k.items()) or "default"


def _compare(opt, params, expected):
    for t, exp in enumerate(expected):
        set_grads(params, t)
        opt.step()
        for p, e in zip(params, exp):
            np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs", CASES, ids=_id)
def test_dog_matches_numpy_transcription(kwargs):
    params = make_params()
    expected = dog_numpy([p.detach().numpy() for p in params], STEPS, [list(range(len(SHAPES)))], **kwargs)
    _compare(DoG(params, **kwargs), params, expected)


@pytest.mark.parametrize("kwargs", CASES, ids=_id)
def test_ldog_matches_numpy_transcription(kwargs):
    params = make_params()
    expected = dog_numpy([p.detach().numpy() for p in params], STEPS, [[i] for i in range(len(SHAPES))], **kwargs)
    _compare(LDoG(params, **kwargs), params, expected)


def test_dog_groups_are_separate_blocks():
    params = make_params()
    expected = dog_numpy([p.detach().numpy() for p in params], STEPS, [[0, 1], [2, 3]])
    _compare(DoG([{"params": params[:2]}, {"params": params[2:]}]), params, expected)


def test_dog_first_step_size_and_growth():
    params = make_params()
    opt = DoG(params)
    set_grads(params, 0)
    x0_norm = torch.sqrt(sum((p.detach() ** 2).sum() for p in params)).item()
    g_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params)).item()
    opt.step()
    assert opt.param_groups[0]["eta"] == pytest.approx(1e-6 * (1 + x0_norm) / np.sqrt(g_norm**2 + 1e-8), rel=1e-12)
    for t in range(1, 40):
        set_grads(params, t)
        opt.step()
    assert opt.param_groups[0]["rbar"] > 1e3 * 1e-6 * (1 + x0_norm), "the distance estimate should grow quickly"


def _teacher_mlp_run(make, dtype=torch.float32, steps=300):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 16, generator=g)
    y = (torch.tanh(X @ torch.randn(16, 32, generator=g)) @ torch.randn(32, 4, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(dtype)
    start = [p.detach().clone() for p in model.parameters()]
    opt = make(model.parameters())
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(X.to(dtype)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item(), start, list(model.parameters())


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_trains_mlp_with_no_lr_tuning(cls):
    """Defaults only (the paper: no learning rate to tune): a small MLP fits a teacher's labels."""
    loss, _, _ = _teacher_mlp_run(cls)
    assert loss < 0.1, loss


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_bfloat16_params_round_stochastically_so_they_move(cls):
    """bfloat16 params rounded to nearest never take DoG's first steps (eta ~ reps_rel |x|, far below half a
    spacing): not one entry moves in 100 steps. By default the writes round stochastically and the same model
    trains, as in float32."""
    _, start, end = _teacher_mlp_run(lambda ps: cls(ps, stochastic_rounding=False), torch.bfloat16, steps=100)
    assert all(torch.equal(a, b) for a, b in zip(start, end))
    loss, _, _ = _teacher_mlp_run(cls, torch.bfloat16)
    assert loss < 0.1, loss


@pytest.mark.parametrize("cls, blocks", [(DoG, [list(range(len(SHAPES)))]), (LDoG, [[i] for i in range(len(SHAPES))])],
                         ids=["dog", "ldog"])
def test_compiled_norms_match_numpy_transcription(cls, blocks):
    """The norms pass compiled (its reductions returned by the kernel) gives the transcription's trajectory."""
    kwargs = dict(weight_decay=0.1)
    params = make_params()
    expected = dog_numpy([p.detach().numpy() for p in params], 6, blocks, **kwargs)
    _compare(cls(params, compile=True, **kwargs), params, expected)


def test_ldog_state_is_per_tensor_closed_form():
    """After a first step each tensor holds its own rbar = reps_rel (1 + ||x0||), G = ||g||^2 + eps and
    eta = lr rbar / sqrt(G), as one-element tensors."""
    params = make_params()
    x0 = [p.detach().clone() for p in params]
    opt = LDoG(params, lr=0.5)
    set_grads(params, 0)
    grads = [p.grad.clone() for p in params]
    opt.step()
    for p, x, g in zip(params, x0, grads):
        state = opt.state[p]
        rbar = 1e-6 * (1 + x.norm().item())
        G = (g**2).sum().item() + 1e-8
        assert state["rbar"].shape == (1,) and state["rbar"].item() == pytest.approx(rbar, rel=1e-12)
        assert state["G"].item() == pytest.approx(G, rel=1e-12)
        assert state["eta"].item() == pytest.approx(0.5 * rbar / np.sqrt(G), rel=1e-12)
        torch.testing.assert_close(p.detach(), x - state["eta"] * g, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("compile", [False, True])
def test_ldog_tensor_joining_later_starts_its_own_recursion(compile):
    """A tensor whose first gradient comes at step 3 takes its first LDoG step then (rbar from its own x0), as an
    optimizer created for it at that point would."""
    params, alone = make_params(), make_params()
    opt = LDoG(params, compile=compile)
    late = len(params) - 1
    for t in range(6):
        set_grads(params, t)
        if t < 3:
            params[late].grad = None
        opt.step()
    solo = LDoG([alone[late]], compile=compile)
    for t in range(3, 6):
        set_grads(alone, t)
        solo.step()
    torch.testing.assert_close(params[late], alone[late], rtol=1e-13, atol=1e-15)


def test_ldog_keeps_its_sums_in_float32_under_bfloat16_states():
    """Under state_dtype=bfloat16, G (a growing sum: bfloat16 would stop adding a small ||g||^2 to it), rbar and
    eta stay float32."""
    params = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(2)]
    opt = LDoG(params, state_dtype=torch.bfloat16)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    state = opt.state[params[0]]
    assert state["G"].dtype == state["rbar"].dtype == state["eta"].dtype == torch.float32


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_initial_point_is_kept_exact_under_bfloat16_states(cls):
    """state_dtype=bfloat16 does not round x0: a rounded x0 would make the first distance ||x_1 - x_0|| its rounding
    error (~2**-9 ||x0||, far above reps_rel (1 + ||x0||)). x0 is DoG's only param-sized state, so the run equals
    the float32-state one exactly."""
    ref = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(2)]
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    start = [p.detach().clone() for p in params]
    opts = [cls(ref), cls(params, state_dtype=torch.bfloat16)]
    step_alike(ref, params, opts, 5)
    for p, x0 in zip(params, start):
        assert opts[1].state[p]["x0"].dtype == torch.float32 and torch.equal(opts[1].state[p]["x0"], x0)
    for a, b in zip(params, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_float16_params_warn_that_their_steps_round_to_nearest(cls):
    """float16 has no stochastic rounding here: DoG's first steps would be lost as bfloat16's were, so building the
    optimizer over float16 params says so (bfloat16 and float32 params build silently)."""
    with pytest.warns(UserWarning, match="float16 params are written rounded to nearest.*step size"):
        cls([torch.nn.Parameter(torch.ones(3, dtype=torch.float16))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls([torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16)), torch.nn.Parameter(torch.ones(3))])
