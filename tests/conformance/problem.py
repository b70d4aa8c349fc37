"""A small deterministic problem every optimizer in the registry is exercised on."""

from __future__ import annotations

import torch

from steepest.core.registry import MethodInfo

SHAPES = [(5, 4), (7,), (1,), (3, 2, 2)]


def make_params(dtype=torch.float64, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


def loss_fn(params):
    """A smooth non-quadratic loss with a different curvature per coordinate."""
    total = 0.0
    for i, p in enumerate(params):
        x = p.double() if p.dtype in (torch.bfloat16, torch.float16) else p
        scale = torch.linspace(0.5, 2.0 + i, x.numel(), dtype=x.dtype).reshape(x.shape)
        total = total + (scale * (x - 0.3) ** 2).sum() + 0.1 * torch.sin(3 * x).sum()
    return total


def closure_for(opt, params):
    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward(create_graph=getattr(opt, "needs_graph", False))
        return loss

    return closure


def make_opt(info: MethodInfo, params, **overrides):
    kwargs = {**info.example_kwargs, **overrides}
    return info.cls(params, **kwargs)


def run(info: MethodInfo, steps=5, dtype=torch.float64, seed=0, params=None, **overrides):
    """Take `steps` steps on the problem; returns (params, optimizer)."""
    params = make_params(dtype, seed) if params is None else params
    torch.manual_seed(seed)
    opt = make_opt(info, params, **overrides)
    for _ in range(steps):
        opt.step(closure_for(opt, params))
    return params, opt


def snapshot(params):
    return [p.detach().clone() for p in params]
