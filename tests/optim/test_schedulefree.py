"""Schedule-Free SGD / AdamW: float64 trajectories equal the authors' package; train()/eval(); behaviour."""

from __future__ import annotations

import pytest
import torch

schedulefree = pytest.importorskip("schedulefree")

from steepest.optim.schedulefree import AdamWScheduleFree, SGDScheduleFree  # noqa: E402

from .trajectory import continue_in_step, set_smooth_grads, torch_params  # noqa: E402

STEPS = 25


def assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)


CASES = [
    dict(),
    dict(warmup_steps=5),
    dict(weight_decay=0.1),
    dict(warmup_steps=4, weight_decay=0.05, r=1.0),
    dict(warmup_steps=3, weight_lr_power=0.0),
    # AdamW: a decay below 1e-20 takes the unfolded form (g / denom, then + wd y).
    dict(weight_decay=1e-22),
]


def _run_pair(ours_cls, theirs_cls, kwargs, eval_every=5, lr_drop_at=None):
    a, b = torch_params(), torch_params()
    ours, theirs = ours_cls(a, **kwargs), theirs_cls(b, **kwargs)
    ours.train()
    theirs.train()
    for t in range(STEPS):
        if t == lr_drop_at:
            for opt in (ours, theirs):
                for group in opt.param_groups:
                    group["lr"] *= 0.3
        set_smooth_grads(a, t)
        set_smooth_grads(b, t)
        ours.step()
        theirs.step()
        assert_same(a, b)  # train mode: params hold y
        if t % eval_every == eval_every - 1:
            ours.eval()
            theirs.eval()
            assert_same(a, b)  # eval mode: params hold the average x
            ours.train()
            theirs.train()
            assert_same(a, b)
    for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
        assert ours.param_groups[0][key] == pytest.approx(theirs.param_groups[0][key], rel=1e-12)


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()) or "default")
def test_sgd_schedulefree_matches_package(kwargs):
    _run_pair(SGDScheduleFree, schedulefree.SGDScheduleFree, {"lr": 0.05, "momentum": 0.9, **kwargs})


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()) or "default")
def test_adamw_schedulefree_matches_package(kwargs):
    _run_pair(AdamWScheduleFree, schedulefree.AdamWScheduleFree, {"lr": 0.02, "betas": (0.9, 0.99), **kwargs})


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", [
    (SGDScheduleFree, schedulefree.SGDScheduleFree, {"lr": 0.05, "momentum": 0.9, "warmup_steps": 3}),
    (AdamWScheduleFree, schedulefree.AdamWScheduleFree, {"lr": 0.02, "weight_decay": 0.05}),
], ids=["sgd", "adamw"])
def test_lr_lowered_mid_run_matches_package(ours_cls, theirs_cls, kwargs):
    # A scheduler lowering lr: from then on the average's weights use the largest lr so far (lr_max), not lr.
    _run_pair(ours_cls, theirs_cls, kwargs, lr_drop_at=10)


def test_package_defaults_match():
    _run_pair(SGDScheduleFree, schedulefree.SGDScheduleFree, {"lr": 0.05})
    _run_pair(AdamWScheduleFree, schedulefree.AdamWScheduleFree, {})


def test_two_groups_and_momentum_variants_match_package():
    a, b = torch_params(), torch_params()

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01, "momentum": 0.5, "warmup_steps": 3}]

    ours = SGDScheduleFree(groups(a), lr=0.05, momentum=0.8, weight_decay=0.01)
    theirs = schedulefree.SGDScheduleFree(groups(b), lr=0.05, momentum=0.8, weight_decay=0.01)
    theirs.train()
    for t in range(STEPS):
        set_smooth_grads(a, t)
        set_smooth_grads(b, t)
        ours.step()
        theirs.step()
        assert_same(a, b)
    ours.eval()
    theirs.eval()
    assert_same(a, b)


def test_eval_train_round_trip_and_step_in_eval_mode_raises():
    params = torch_params()
    opt = AdamWScheduleFree(params, lr=0.02)
    for t in range(3):
        set_smooth_grads(params, t)
        opt.step()
    y = [p.detach().clone() for p in params]
    opt.eval()
    assert not all(torch.equal(p, q) for p, q in zip(params, y))
    set_smooth_grads(params, 3)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="train"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    opt.eval()  # idempotent
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    opt.train()
    for p, q in zip(params, y):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-14)


def test_state_dict_in_eval_mode_round_trips():
    a = torch_params()
    opt = SGDScheduleFree(a, lr=0.05, warmup_steps=3)
    for t in range(4):
        set_smooth_grads(a, t)
        opt.step()
    opt.eval()
    sd = opt.state_dict()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt2 = SGDScheduleFree(b, lr=0.05, warmup_steps=3)
    opt2.load_state_dict(sd)
    assert not opt2.param_groups[0]["train_mode"]
    opt.train()
    opt2.train()
    continue_in_step(range(4, 8), (a, opt), (b, opt2))


def _noisy_regression(seed=0, n=2048, d=20):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    w_star = torch.randn(d, generator=g)
    y = X @ w_star + 0.5 * torch.randn(n, generator=g)
    return X, y, g


def _full_loss(X, y, w):
    return 0.5 * ((X @ w - y) ** 2).mean().item()


@pytest.mark.parametrize("cls, ref", [(SGDScheduleFree, "sgd"), (AdamWScheduleFree, "adamw")])
def test_averaged_point_beats_constant_lr_base_method_on_noisy_problem(cls, ref):
    """The paper's claim at constant lr with no schedule: x (eval mode) ends well below the base method's
    iterate, which stalls at its noise floor."""
    X, y, g = _noisy_regression()
    w_sf = torch.zeros(X.shape[1], requires_grad=True)
    w_base = torch.zeros(X.shape[1], requires_grad=True)
    if ref == "sgd":  # the package's defaults; SGD with the same effective step lr/(1 - momentum)
        opt = cls([w_sf])
        base = torch.optim.SGD([w_base], lr=opt.defaults["lr"] * (1 - 0.9), momentum=0.9)
    else:  # one constant lr for both, large enough that AdamW's iterate sits at its noise floor
        opt = cls([w_sf], lr=0.03)
        base = torch.optim.AdamW([w_base], lr=0.03, weight_decay=0.0)
    steps = 600 if ref == "sgd" else 1000
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (16,), generator=g)
        for w, o in ((w_sf, opt), (w_base, base)):
            loss = 0.5 * ((X[idx] @ w - y[idx]) ** 2).mean()
            o.zero_grad()
            loss.backward()
            o.step()
    opt.eval()
    floor = _full_loss(X, y, torch.linalg.lstsq(X, y).solution)
    sf, bl = _full_loss(X, y, w_sf.detach()), _full_loss(X, y, w_base.detach())
    assert sf - floor < 0.5 * (bl - floor), (sf, bl, floor)
    assert sf - floor < 0.02, (sf, floor)
