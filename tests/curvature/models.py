"""Small float64 models, data and dense oracles (torch.func) for the curvature tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

DT = torch.float64


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.head = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = nn.functional.avg_pool2d(h, 2)
        return self.head(h.flatten(1))


class LayerNorm(nn.Module):
    """LayerNorm from plain ops: torch.func.hessian through nn.LayerNorm's fused kernel comes out
    asymmetric in torch 2.13 (a functorch double-backward problem; plain autograd is right, checked
    against finite differences in test_operators), so the dense oracle avoids it."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), eps

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


class TinyTransformer(nn.Module):
    """A pre-norm transformer block (one softmax attention layer with 2 heads, a GELU MLP) and a head,
    written out with plain ops so torch.func can build a dense oracle."""

    def __init__(self, d=4, heads=2, ff=8, classes=3):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = LayerNorm(d), LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


def make(name: str, seed: int = 0):
    """(model, loss_fn, batches, X, Y) for 'mlp', 'cnn', 'transformer' or 'mlp_mse'."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = 13
    if name in ("mlp", "mlp_mse"):
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        X = torch.randn(n, 5, generator=g, dtype=DT)
    elif name == "cnn":
        model = TinyCNN()
        X = torch.randn(n, 1, 6, 6, generator=g, dtype=DT)
    elif name == "transformer":
        model = TinyTransformer()
        X = torch.randn(n, 5, 4, generator=g, dtype=DT)
    else:
        raise ValueError(name)
    model = model.double()
    if name == "mlp_mse":
        Y = torch.randn(n, 3, generator=g, dtype=DT)
        loss_fn = nn.MSELoss()
    else:
        Y = torch.randint(0, 3, (n,), generator=g)
        loss_fn = nn.CrossEntropyLoss()
    batches = [(X[:5], Y[:5]), (X[5:], Y[5:])]  # uneven batches: the average must weight by size
    return model, loss_fn, batches, X, Y


def flat_params(model, params=None):
    ps = list(model.parameters()) if params is None else params
    return torch.cat([p.detach().reshape(-1) for p in ps])


def _functional(model, params=None):
    named = dict(model.named_parameters())
    chosen = [n for n, p in named.items() if params is None or any(p is q for q in params)]
    shapes = [named[n].shape for n in chosen]

    def call(flat, X):
        ps, o = {}, 0
        for n, s in zip(chosen, shapes):
            k = s.numel()
            ps[n] = flat[o:o + k].view(s)
            o += k
        return functional_call(model, ps, (X,))

    return call


def dense_hessian(model, loss_fn, X, Y, params=None):
    call = _functional(model, params)
    # forward-over-reverse; the math attention kernel supports forward-mode AD (the CPU flash one does not)
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.hessian(lambda f: loss_fn(call(f, X), Y))(flat_params(model, params))


def dense_ggn(model, loss_fn, X, Y, params=None):
    call = _functional(model, params)
    theta = flat_params(model, params)
    J = torch.func.jacrev(lambda f: call(f, X))(theta)  # out_shape + (n,)
    out = call(theta, X).detach()
    HL = torch.func.hessian(lambda o: loss_fn(o, Y))(out)
    Jm = J.reshape(-1, theta.numel())
    return Jm.T @ HL.reshape(Jm.shape[0], Jm.shape[0]) @ Jm


def per_example_grads(model, loss_fn, X, Y, params=None):
    call = _functional(model, params)
    theta = flat_params(model, params)
    def one(i):
        return torch.func.grad(lambda f: loss_fn(call(f, X[i:i + 1]), Y[i:i + 1]))(theta)

    return torch.stack([one(i) for i in range(X.shape[0])])


def dense_fisher(model, loss_fn, X, Y, params=None):
    G = per_example_grads(model, loss_fn, X, Y, params)
    return G.T @ G / X.shape[0]


def dense_grad(model, loss_fn, X, Y):
    call = _functional(model)
    return torch.func.grad(lambda f: loss_fn(call(f, X), Y))(flat_params(model))
