"""The small problem oracle trajectory tests share: fixed shapes, a gradient that is a smooth function of
the point plus a step-dependent disturbance (so gradient signs change), and a float64 torch run of it."""

from __future__ import annotations

import numpy as np
import torch


def make_arrays(shapes, seed=0):
    """Starting points, one float64 array per shape."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def grad_fn(i, x, t):
    """The gradient of tensor i at x on step t: a smooth loss's gradient plus a disturbance."""
    scale = np.linspace(0.5, 2.0 + i, x.size).reshape(x.shape)
    return 2 * scale * (x - 0.3) + 0.3 * np.cos(3 * x) + 0.5 * np.sin(0.7 * t + np.arange(x.size).reshape(x.shape))


def run_torch_full(make_opt, arrays, steps, grad=grad_fn):
    """Run an optimizer built by make_opt(params) for `steps` steps on float64 copies of arrays;
    returns (final arrays, optimizer, params)."""
    params = [torch.nn.Parameter(torch.tensor(a, dtype=torch.float64)) for a in arrays]
    opt = make_opt(params)
    for t in range(1, steps + 1):
        for i, p in enumerate(params):
            p.grad = torch.from_numpy(grad(i, p.detach().numpy(), t))
        opt.step()
    return [p.detach().numpy() for p in params], opt, params


def run_torch(make_opt, arrays, steps, grad=grad_fn):
    """The final arrays of :func:`run_torch_full`."""
    return run_torch_full(make_opt, arrays, steps, grad)[0]


def bind(shapes, steps, with_opt=False):
    """``make_arrays(seed=0)`` and ``run_torch(make_opt, arrays, steps=steps)`` for one test file's problem;
    with_opt: run_torch returns (final arrays, optimizer)."""
    def make(seed=0):
        return make_arrays(shapes, seed)

    def run(make_opt, arrays, steps=steps):
        out, opt, _ = run_torch_full(make_opt, arrays, steps)
        return (out, opt) if with_opt else out

    return make, run


# Shapes of the lockstep comparisons with the authors' packages; PIECE_SHAPES span several of the eager passes'
# 2**18-element pieces (one tensor alone, small ones sharing a piece).
PACKAGE_SHAPES = [(6, 5), (7,), (1,), (3, 2, 2)]
PIECE_SHAPES = [(700, 500), (3,), (200000,), (100, 1000), (5, 2)]


def torch_params(shapes=PACKAGE_SHAPES, seed=0):
    """float64 Parameters drawn from a seeded torch.Generator, one per shape."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]


def set_smooth_grads(params, t):
    """A smooth non-quadratic loss's gradient that changes with the step (deterministic), set as p.grad."""
    for i, p in enumerate(params):
        scale = torch.linspace(0.5, 2.0 + i, p.numel(), dtype=torch.float64).reshape(p.shape)
        p.grad = (2 * scale * (p.detach() - 0.3) + 0.3 * torch.cos(3 * p.detach() + 0.1 * t)).clone()


def step_alike(ref, params, opts, steps):
    """Step ``opts`` (over ``ref`` and ``params``, equal copies) ``steps`` times with the same gradients,
    cos(x (t + 2)) of ref's values."""
    for t in range(steps):
        for a, b in zip(ref, params):
            a.grad = torch.cos(a.detach() * (t + 2))
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()


def continue_in_step(steps, *runs) -> None:
    """Step each (params, optimizer) run on the same smooth gradients at steps ``steps``, then check that their params
    are bitwise equal (a resumed run against the one it was saved from)."""
    for t in steps:
        for params, opt in runs:
            set_smooth_grads(params, t)
            opt.step()
    first = runs[0][0]
    for params, _ in runs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(first, params))
