"""Lion against lion-pytorch and a float64 NumPy transcription of the authors' google/automl code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lion_pytorch import Lion as LionPyTorch

import steepest

from . import trajectory
from .trajectory import grad_fn

SHAPES = [(5, 4), (7,), (3, 2, 2)]
STEPS = 30


make_arrays, run_torch = trajectory.bind(SHAPES, STEPS)


def authors_lion(arrays, steps=STEPS, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
    """google/automl lion/lion_pytorch.py, transcribed in float64."""
    b1, b2 = betas
    xs = [a.copy() for a in arrays]
    m = [np.zeros_like(a) for a in arrays]
    for t in range(1, steps + 1):
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t)
            x *= 1 - lr * weight_decay
            x -= lr * np.sign(m[i] * b1 + g * (1 - b1))
            m[i] = m[i] * b2 + g * (1 - b2)
    return xs


CASES = [
    dict(lr=1e-2),
    dict(lr=3e-2, betas=(0.95, 0.98), weight_decay=1.0),
    dict(lr=1e-3, betas=(0.0, 0.9), weight_decay=0.1),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_matches_authors_transcription(kwargs):
    arrays = make_arrays()
    got = run_torch(lambda ps: steepest.Lion(ps, **kwargs), arrays)
    want = authors_lion(arrays, **kwargs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kwargs", CASES)
def test_matches_lion_pytorch(kwargs):
    arrays = make_arrays(1)
    got = run_torch(lambda ps: steepest.Lion(ps, **kwargs), arrays)
    want = run_torch(lambda ps: LionPyTorch(ps, **kwargs), arrays)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_every_coordinate_moves_by_lr():
    """Without weight decay each coordinate moves by exactly lr per step (the sign update)."""
    arrays = make_arrays(2)
    before = [a.copy() for a in arrays]
    after = run_torch(lambda ps: steepest.Lion(ps, lr=1e-3), arrays, steps=1)
    for a, b in zip(after, before):
        np.testing.assert_allclose(np.abs(a - b), 1e-3, rtol=1e-9)


def test_trains_a_small_classifier():
    """Behaviour: Lion, with lr 3x below the 1e-2 AdamW takes here (the paper: 3-10x), fits a small MLP."""
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x @ torch.randn(10, 3)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = steepest.Lion(model.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
