"""QHM and QHAdam against the authors' qhoptim package and float64 NumPy transcriptions of the paper."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import steepest

from . import trajectory
from .trajectory import grad_fn

qhoptim = pytest.importorskip("qhoptim.pyt")

SHAPES = [(5, 4), (7,), (3, 2, 2)]
STEPS = 25


def make_arrays(seed=0):
    return trajectory.make_arrays(SHAPES, seed)




def run_torch(make_opt, arrays, steps=STEPS):
    params = [torch.nn.Parameter(torch.tensor(a, dtype=torch.float64)) for a in arrays]
    opt = make_opt(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qhoptim uses torch's deprecated add_(scalar, tensor) signature
        for t in range(1, steps + 1):
            for i, p in enumerate(params):
                p.grad = torch.from_numpy(grad_fn(i, p.detach().numpy(), t))
            opt.step()
    return [p.detach().numpy() for p in params]


def close(got, want, rtol=1e-10):
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)


# ------------------------------------------------------------------------------------------ QHM
def paper_qhm(arrays, steps=STEPS, lr=1e-3, momentum=0.999, nu=0.7, weight_decay=0.0, weight_decay_type="grad"):
    """QHM, eq. (3) of arXiv 1810.06801, with qhoptim's two weight-decay placements."""
    xs = [a.copy() for a in arrays]
    buf = [np.zeros_like(a) for a in arrays]
    for t in range(1, steps + 1):
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t)
            if weight_decay and weight_decay_type == "grad":
                g = g + weight_decay * x
            elif weight_decay:
                x *= 1 - lr * weight_decay
            buf[i] = momentum * buf[i] + (1 - momentum) * g
            x -= lr * ((1 - nu) * g + nu * buf[i])
    return xs


QHM_CASES = [
    dict(lr=0.5, momentum=0.9, nu=0.7),
    dict(lr=0.2, momentum=0.999, nu=0.7),
    dict(lr=0.3, momentum=0.9, nu=0.0),  # plain SGD
    dict(lr=0.3, momentum=0.9, nu=1.0),  # dampened momentum
    dict(lr=0.4, momentum=0.8, nu=0.6, weight_decay=0.1, weight_decay_type="grad"),
    dict(lr=0.4, momentum=0.8, nu=0.6, weight_decay=0.1, weight_decay_type="direct"),
]


# The fused (torch.compile) path is checked on the richest case of each; compiling costs seconds per case.
@pytest.mark.parametrize("kwargs,compile", [(k, False) for k in QHM_CASES] + [(QHM_CASES[-1], True)])
def test_qhm_matches_qhoptim_and_paper(kwargs, compile):
    arrays = make_arrays()
    got = run_torch(lambda ps: steepest.QHM(ps, compile=compile, **kwargs), arrays)
    ref = run_torch(lambda ps: qhoptim.QHM(ps, **kwargs), arrays)
    close(got, ref)
    close(got, paper_qhm(arrays, **kwargs))


def test_qhm_with_nu_zero_is_plain_sgd():
    arrays = make_arrays(1)
    close(run_torch(lambda ps: steepest.QHM(ps, lr=0.1, momentum=0.9, nu=0.0), arrays),
          run_torch(lambda ps: torch.optim.SGD(ps, lr=0.1), arrays))


# --------------------------------------------------------------------------------------- QHAdam
def paper_qhadam(arrays, steps=STEPS, lr=1e-3, betas=(0.9, 0.999), nus=(1.0, 1.0), eps=1e-8, weight_decay=0.0,
                 decoupled=False):
    """QHAdam, Algorithm 1 of arXiv 1810.06801: bias-corrected EMAs, eps outside the mixed root."""
    b1, b2 = betas
    nu1, nu2 = nus
    xs = [a.copy() for a in arrays]
    m = [np.zeros_like(a) for a in arrays]
    v = [np.zeros_like(a) for a in arrays]
    for t in range(1, steps + 1):
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t)
            if weight_decay and decoupled:
                x *= 1 - lr * weight_decay
            elif weight_decay:
                g = g + weight_decay * x
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            num = (1 - nu1) * g + nu1 * m_hat
            den = np.sqrt((1 - nu2) * g * g + nu2 * v_hat) + eps
            x -= lr * num / den
    return xs


QHADAM_CASES = [
    dict(lr=1e-2),
    dict(lr=2e-2, nus=(0.7, 1.0), betas=(0.995, 0.999)),
    dict(lr=2e-2, nus=(0.8, 0.6), betas=(0.9, 0.99)),
    dict(lr=1e-2, nus=(0.7, 0.9), eps=1e-3),  # a large eps makes its placement visible
    dict(lr=1e-2, nus=(0.7, 1.0), weight_decay=0.1),
    dict(lr=1e-2, nus=(0.7, 1.0), weight_decay=0.1, decoupled=True),
]


@pytest.mark.parametrize("kwargs,compile", [(k, False) for k in QHADAM_CASES] + [(QHADAM_CASES[-1], True)])
def test_qhadam_matches_qhoptim_and_paper(kwargs, compile):
    arrays = make_arrays()
    ours = {k: v for k, v in kwargs.items() if k != "decoupled"}
    theirs = dict(ours)
    if kwargs.get("decoupled"):
        ours["decoupled_weight_decay"] = True
        theirs["decouple_weight_decay"] = True
    got = run_torch(lambda ps: steepest.QHAdam(ps, compile=compile, **ours), arrays)
    close(got, run_torch(lambda ps: qhoptim.QHAdam(ps, **theirs), arrays))
    close(got, paper_qhadam(arrays, **kwargs))


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("nus", [(0.7, 1.0), (1.0, 1.0)])
def test_qhadam_overflowing_squared_gradient_follows_qhoptim(nus, compile):
    """A float32 gradient of 1e25 squares to inf (however the weight is applied): v turns infinite and the step 0,
    as in qhoptim, and stays so (a lerp from the infinite v, inf - inf, made the parameters NaN)."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(6, 5)) for _ in range(2)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o1 = steepest.QHAdam(ours, lr=1e-2, nus=nus, compile=compile)
    o2 = qhoptim.QHAdam(theirs, lr=1e-2, nus=nus)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for scale in (1.0, 1.0, 1e25, 1.0):
            for p, q in zip(ours, theirs):
                p.grad = torch.randn_like(p) * scale
                q.grad = p.grad.clone()
            o1.step()
            o2.step()
    for p, q in zip(ours, theirs):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_qhadam_with_unit_nus_is_adam():
    arrays = make_arrays(2)
    close(run_torch(lambda ps: steepest.QHAdam(ps, lr=1e-2, nus=(1.0, 1.0)), arrays),
          run_torch(lambda ps: torch.optim.Adam(ps, lr=1e-2), arrays), rtol=1e-9)


def test_eps_placement_differs_from_eps_inside_bias_correction():
    """Where eps sits shows at ~1e-8 relative; the fp64 oracle comparison above is tight enough to see it."""
    arrays = make_arrays(3)
    got = run_torch(lambda ps: steepest.QHAdam(ps, lr=1e-2, nus=(0.7, 1.0)), arrays)
    # eps added inside the bias correction (sqrt(v)/sqrt(bc2) + eps vs sqrt(v) + eps, then / sqrt(bc2)):
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-2
    xs = [a.copy() for a in arrays]
    m = [np.zeros_like(a) for a in arrays]
    v = [np.zeros_like(a) for a in arrays]
    for t in range(1, STEPS + 1):
        for i, x in enumerate(xs):
            g = grad_fn(i, x, t)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            num = 0.3 * g + 0.7 * m[i] / (1 - b1**t)
            x -= lr * num / ((np.sqrt(v[i]) + eps) / np.sqrt(1 - b2**t))
    diff = max(np.max(np.abs(a - b) / (np.abs(b) + 1e-12)) for a, b in zip(got, xs))
    assert diff > 1e-10


# ------------------------------------------------------------------------------------ behaviour
def test_qhm_and_qhadam_minimise_an_ill_conditioned_quadratic():
    torch.manual_seed(0)
    scales = torch.logspace(-2, 0, 20, dtype=torch.float64)
    for make in (lambda p: steepest.QHM([p], lr=1.0, momentum=0.9, nu=0.7),
                 lambda p: steepest.QHAdam([p], lr=0.05, nus=(0.7, 1.0), betas=(0.995, 0.999))):
        p = torch.nn.Parameter(torch.ones(20, dtype=torch.float64))
        opt = make(p)
        for _ in range(600):
            opt.zero_grad()
            loss = 0.5 * (scales * p**2).sum()
            loss.backward()
            opt.step()
        assert float(0.5 * (scales * p.detach() ** 2).sum()) < 1e-4 * float(0.5 * scales.sum())


def test_qhadam_takes_qhoptims_name_for_decoupled_decay():
    """qhoptim.QHAdam(..., decouple_weight_decay=True) runs unchanged on steepest.QHAdam: the same step as
    decoupled_weight_decay=True; the two names disagreeing is an error."""
    arrays = make_arrays()
    kwargs = dict(lr=1e-2, nus=(0.7, 1.0), weight_decay=0.1)
    by_their_name = run_torch(lambda ps: steepest.QHAdam(ps, decouple_weight_decay=True, **kwargs), arrays)
    by_ours = run_torch(lambda ps: steepest.QHAdam(ps, decoupled_weight_decay=True, **kwargs), arrays)
    close(by_their_name, by_ours)
    close(by_their_name, run_torch(lambda ps: qhoptim.QHAdam(ps, decouple_weight_decay=True, **kwargs), arrays))
    with pytest.raises(ValueError, match="decouple_weight_decay"):
        steepest.QHAdam([torch.nn.Parameter(torch.zeros(2))], decoupled_weight_decay=True, decouple_weight_decay=False)
