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


def run_pair(ours_cls, theirs_cls, kwargs, groups=None, steps=STEPS, shapes=PACKAGE_SHAPES, **engine):
    a, b = torch_params(shapes), torch_params(shapes)
    pa, pb = (groups(a), groups(b)) if groups else (a, b)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Using decoupled weight decay"
        theirs = theirs_cls(pb, **kwargs)
    ours = ours_cls(pa, **kwargs, **engine)
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


@pytest.mark.parametrize("decouple", [True, False])
def test_dadapt_adam_group_with_lr_0_takes_only_decoupled_decay_as_the_package(decouple):
    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.0, "weight_decay": 0.2}]

    opt = run_pair(DAdaptAdam, dadaptation.DAdaptAdam, dict(weight_decay=0.01, decouple=decouple), groups=groups)
    frozen = [p for g in opt.param_groups[1:] for p in g["params"]]
    assert all(not opt.state[p]["exp_avg"].any() for p in frozen)


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


def test_dadapt_sgd_compiled_matches_package():
    run_pair(DAdaptSGD, dadaptation.DAdaptSGD, dict(momentum=0.9, weight_decay=0.01), steps=6, compile=True)


@pytest.mark.parametrize("kwargs", [dict(), dict(weight_decay=0.1, decouple=True), dict(weight_decay=0.1)], ids=_id)
def test_dadapt_adam_compiled_matches_package(kwargs):
    """The compiled passes (from the second step one kernel for moments and descent, its reductions returned)
    follow the package's float64 trajectory."""
    run_pair(DAdaptAdam, dadaptation.DAdaptAdam, kwargs, steps=8, compile=True)


def test_dadapt_adam_compiled_matches_package_without_the_merged_pass():
    """b2 = 0 keeps the moments and the descent in two passes (s = dlr g can then be all zero at any step)."""
    run_pair(DAdaptAdam, dadaptation.DAdaptAdam, dict(betas=(0.9, 0.0)), steps=6, compile=True)


def _cancel_s_in_the_second_step(opt, params, **group_values):
    """A first step, then group values that make dlr a power of 2 and gradients that cancel s exactly; checks the
    warning, s = 0, k still 1 and p moved."""
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for group in opt.param_groups:
        group.update(group_values)
    for p in params:
        p.grad = -(2.0**10) * opt.state[p]["s"]
    before = [p.detach().clone() for p in params]
    with pytest.warns(RuntimeWarning, match="cancelled to exactly 0"):
        opt.step()
    assert all(torch.count_nonzero(opt.state[p]["s"]) == 0 for p in params)
    assert opt.param_groups[0]["k"] == 1
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    return opt


@pytest.mark.parametrize("compile", [False, True])
def test_dadapt_adam_warns_when_s_cancels_after_the_merged_step(compile):
    """A step whose gradients cancel every entry of s exactly: the package skips the descent; here moments and
    descent are one pass by then, so the step is taken, and said so. k and d stay as the package leaves them."""
    params = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)) for _ in range(2)]
    opt = DAdaptAdam(params, betas=(0.9, 0.25), compile=compile)  # sqrt(b2) = 1/2
    # dlr (1 - sqrt(b2)) = 2**-11: s/2 + 2**-11 g with g = -2**10 s is exactly 0
    _cancel_s_in_the_second_step(opt, params, d=2.0**-10)
    assert opt.param_groups[0]["d"] == 2.0**-10


@pytest.mark.parametrize("compile", [False, True])
def test_dadapt_sgd_warns_when_s_cancels_after_the_merged_step(compile):
    params = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)) for _ in range(2)]
    opt = DAdaptSGD(params, momentum=0.5, compile=compile)
    _cancel_s_in_the_second_step(opt, params, d=2.0**-10, g0_norm=1.0)  # dlr = 2**-10: s + 2**-10 g = 0


@pytest.mark.parametrize("cls", ["DAdaptAdam", "DAdaptSGD"])
def test_log_every_logs_the_d_estimate_and_older_state_dicts_load(cls, caplog):
    """The package's log_every: an INFO record every n steps with the current d; a state_dict written before the
    option existed loads (as log_every 0)."""
    import logging

    import steepest

    params = [torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))]
    opt = getattr(steepest, cls)(params, log_every=2)
    with caplog.at_level(logging.INFO, logger="steepest.optim.dadapt"):
        for t in range(5):
            params[0].grad = torch.sin(params[0].detach() * (t + 1))
            opt.step()
    records = [r.getMessage() for r in caplog.records if r.name == "steepest.optim.dadapt"]
    assert [m.split(":")[0] for m in records] == [f"{cls} step {k}" for k in (0, 2, 4)]
    assert f"d {opt.param_groups[0]['d']:g}" in records[-1]
    old = opt.state_dict()
    del old["param_groups"][0]["log_every"]
    fresh = getattr(steepest, cls)(params, log_every=3)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["log_every"] == 0
