"""D-Adaptation Adam / SGD: float64 trajectories equal the authors' package (dadaptation 3.2); behaviour."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

dadaptation = pytest.importorskip("dadaptation")

from steepest.optim.dadapt import DAdaptAdam, DAdaptSGD  # noqa: E402

from .trajectory import PACKAGE_SHAPES, PIECE_SHAPES, set_smooth_grads, torch_params  # noqa: E402

STEPS = 30


def run_pair(ours_cls, theirs_cls, kwargs, groups=None, steps=STEPS, shapes=PACKAGE_SHAPES):
    a, b = torch_params(shapes), torch_params(shapes)
    pa, pb = (groups(a), groups(b)) if groups else (a, b)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Using decoupled weight decay"
        theirs = theirs_cls(pb, **kwargs)
    ours = ours_cls(pa, **kwargs)
    for t in range(steps):
        set_smooth_grads(a, t)
        set_smooth_grads(b, t)
        ours.step()
        theirs.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-10, atol=1e-12)
        for key in ("d", "numerator_weighted", "k"):
            assert ours.param_groups[0][key] == pytest.approx(float(theirs.param_groups[0][key]), rel=1e-9)
    return ours


def _id(k):
    return ",".join(f"{a}={v}" for a, v in k.items()) or "default"


ADAM_CASES = [
    dict(),
    dict(use_bias_correction=True),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, decouple=True),
    dict(growth_rate=1.1),
    dict(betas=(0.8, 0.99), eps=1e-6, d0=1e-4, lr=0.5),
]


@pytest.mark.parametrize("kwargs", ADAM_CASES, ids=_id)
def test_dadapt_adam_matches_package(kwargs):
    opt = run_pair(DAdaptAdam, dadaptation.DAdaptAdam, kwargs)
    assert opt.param_groups[0]["d"] > 10 * kwargs.get("d0", 1e-6), "the D estimate should have grown"


def test_dadapt_adam_layer_scale_and_per_group_eps_match_package():
    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "layer_scale": 0.5, "eps": 1e-4, "weight_decay": 0.05}]

    run_pair(DAdaptAdam, dadaptation.DAdaptAdam, dict(weight_decay=0.01), groups=groups)


SGD_CASES = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, weight_decay=0.05),
    dict(momentum=0.5, growth_rate=1.2, d0=1e-3),
    dict(lr=0.5, momentum=0.9),
]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=_id)
def test_dadapt_sgd_matches_package(kwargs):
    opt = run_pair(DAdaptSGD, dadaptation.DAdaptSGD, kwargs)
    assert opt.param_groups[0]["d"] > 10 * kwargs.get("d0", 1e-6), "the D estimate should have grown"
    assert opt.param_groups[0]["g0_norm"] > 0


def test_dadapt_sgd_zero_first_gradient_changes_nothing():
    params = torch_params()
    opt = DAdaptSGD(params, momentum=0.9)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert opt.param_groups[0].get("k", 0) == 0


@pytest.mark.parametrize("cls", [DAdaptAdam, DAdaptSGD])
def test_groups_with_different_lr_or_shared_option_raise_before_any_change(cls):
    a = torch_params()
    shared = {"d0": 1e-3}
    for extra in ({"lr": 0.5}, shared):
        opt = cls([{"params": a[:2]}, {"params": a[2:], **extra}])
        set_smooth_grads(a, 0)
        before = [p.detach().clone() for p in a]
        with pytest.raises(ValueError, match="lr" if "lr" in extra else "d0"):
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(a, before)) and not opt.state


def _teacher_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 16, generator=g)
    y = (torch.tanh(X @ torch.randn(16, 32, generator=g)) @ torch.randn(32, 4, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    return X, y, model


@pytest.mark.parametrize("cls, kwargs, target", [(DAdaptAdam, {}, 0.05), (DAdaptSGD, {"momentum": 0.9}, 0.05)])
def test_trains_mlp_with_no_lr_tuning(cls, kwargs, target):
    """lr left at 1 (the paper's advice; momentum 0.9 for SGD as in its experiments): a small MLP fits a
    teacher network's labels in 150 full-batch steps."""
    X, y, model = _teacher_problem()
    opt = cls(model.parameters(), **kwargs)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < target, loss.item()


def test_dadapt_adam_matches_package_when_the_step_runs_in_several_pieces():
    """Tensors above the 2**18-element pieces of the eager passes: the piecewise step equals the package's."""
    run_pair(DAdaptAdam, dadaptation.DAdaptAdam, dict(weight_decay=0.1, decouple=False), steps=5,
             shapes=PIECE_SHAPES)
