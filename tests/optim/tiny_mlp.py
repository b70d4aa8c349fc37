"""The tiny float64 MLP the Kronecker-factored optimizers' tests (K-FAC, MKOR) train: two Linear layers, the
second without bias, and a free per-output scale that is no layer's weight (it takes the fallback step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

D = torch.float64


class Net(nn.Module):
    def __init__(self, seed=0, dtype=D):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(4, 6).to(dtype)
        self.fc2 = nn.Linear(6, 3, bias=False).to(dtype)
        self.scale = nn.Parameter(torch.linspace(0.8, 1.2, 3, dtype=dtype))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def data(n=8, seed=1, dtype=D):
    """n inputs of 4 features and labels in {0, 1, 2}, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def train(model, opt, steps, x, y, sign=1.0):
    """`steps` full-batch cross-entropy steps (sign=-1 ascends, for maximize checks)."""
    for _ in range(steps):
        opt.zero_grad()
        loss = sign * F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
