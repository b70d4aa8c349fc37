"""Prodigy: float64 trajectories equal the authors' package (prodigyopt 1.1.2); behaviour with no lr tuning."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

prodigyopt = pytest.importorskip("prodigyopt")

from steepest.optim.prodigy import Prodigy  # noqa: E402

from .trajectory import PACKAGE_SHAPES, PIECE_SHAPES, continue_in_step, set_smooth_grads, torch_params  # noqa: E402

STEPS = 30


def package(params, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
        return prodigyopt.Prodigy(params, **kwargs)


CASES = [
    dict(),
    dict(use_bias_correction=True),
    dict(safeguard_warmup=True),
    dict(d_coef=0.5),
    dict(d_coef=2.0, growth_rate=1.05),
    dict(weight_decay=0.1),  # decoupled (the package's default)
    dict(weight_decay=0.1, decouple=False),
    dict(betas=(0.0, 0.99)),
    dict(betas=(0.95, 0.99), beta3=0.9, eps=1e-6, d0=1e-4),
    dict(use_bias_correction=True, safeguard_warmup=True, weight_decay=0.05, decouple=False, lr=2.0),
    dict(slice_p=3),
    dict(slice_p=11, weight_decay=0.1, decouple=False, betas=(0.0, 0.99)),
]


def run_pair(kwargs, groups=None, steps=STEPS, shapes=PACKAGE_SHAPES, **engine):
    a, b = torch_params(shapes), torch_params(shapes)
    pa, pb = (groups(a), groups(b)) if groups else (a, b)
    ours, theirs = Prodigy(pa, **kwargs, **engine), package(pb, **kwargs)
    ds = []
    for t in range(steps):
        set_smooth_grads(a, t)
        set_smooth_grads(b, t)
        ours.step()
        theirs.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-10, atol=1e-12)
        for key in ("d", "d_max", "d_numerator", "k"):
            assert ours.param_groups[0][key] == pytest.approx(float(theirs.param_groups[0][key]), rel=1e-9)
        ds.append(ours.param_groups[0]["d"])
    return ds


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()) or "default")
def test_matches_package(kwargs):
    ds = run_pair(kwargs)
    assert ds[-1] > 10 * kwargs.get("d0", 1e-6), "the D estimate should have grown"


def test_two_groups_with_their_own_eps_and_decay_match_package():
    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "eps": 1e-4, "weight_decay": 0.2, "safeguard_warmup": True}]

    run_pair(dict(weight_decay=0.01), groups=groups)


def test_group_with_lr_0_keeps_its_moments_and_takes_decoupled_decay_as_the_package():
    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.0, "weight_decay": 0.2}]

    a = torch_params()
    frozen = [p.detach().clone() for p in a[2:]]
    run_pair(dict(weight_decay=0.01), groups=groups)
    ours = Prodigy(groups(a), weight_decay=0.01)
    set_smooth_grads(a, 0)
    ours.step()
    dlr = 1e-6  # d0 lr at the first step
    for p, p0 in zip(a[2:], frozen):
        torch.testing.assert_close(p.detach(), p0 * (1 - 0.2 * dlr), rtol=1e-15, atol=0)
        assert not ours.state[p]["exp_avg"].any()


def test_groups_with_different_lr_raise_before_any_change():
    a = torch_params()
    opt = Prodigy([{"params": a[:2]}, {"params": a[2:], "lr": 0.5}])
    set_smooth_grads(a, 0)
    before = [p.detach().clone() for p in a]
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a, before)) and not opt.state


def test_maximize_and_complex_follow_the_real_trajectory():
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(0)))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    oz, orr = Prodigy([z], maximize=True), package([r])
    for t in range(10):
        g = torch.cos(r.detach() * (t + 1))
        r.grad = g.clone()
        z.grad = -torch.view_as_complex(g.clone())
        oz.step()
        orr.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-10, atol=1e-12)


def test_trains_mlp_with_no_lr_tuning():
    """Defaults only: a small MLP fits a teacher network's labels (paper: Adam-level results with no lr)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 16, generator=g)
    y = (torch.tanh(X @ torch.randn(16, 32, generator=g)) @ torch.randn(32, 4, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    opt = Prodigy(model.parameters())
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    assert opt.param_groups[0]["d"] > 1e-3


def _mlp_run(dtype, make):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 16, generator=g)
    y = (torch.tanh(X @ torch.randn(16, 32, generator=g)) @ torch.randn(32, 4, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(dtype)
    opt = make(model.parameters())
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(X.to(dtype)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt.param_groups[0]["d"], loss.item()


def test_bfloat16_params_round_stochastically_so_d_grows():
    """bfloat16 params rounded to nearest lose the first steps of about d0 lr = 1e-6 on all but the entries near
    0, so d grows late: the package (its oracle here) and this optimizer with stochastic_rounding=False end far
    above the float32 run's loss. By default the writes round stochastically, and d and the loss follow the
    float32 run."""
    d32, loss32 = _mlp_run(torch.float32, Prodigy)
    _, loss_pkg = _mlp_run(torch.bfloat16, package)
    d_nearest, loss_nearest = _mlp_run(torch.bfloat16, lambda ps: Prodigy(ps, stochastic_rounding=False))
    d_sr, loss_sr = _mlp_run(torch.bfloat16, Prodigy)
    assert loss32 < 0.01 and min(loss_pkg, loss_nearest) > 100 * loss32 and d_nearest < 0.5 * d32
    assert d_sr == pytest.approx(d32, rel=0.3) and loss_sr == pytest.approx(loss32, rel=0.5)


def test_matches_package_when_the_step_runs_in_several_pieces():
    """Tensors above the 2**18-element pieces of the eager passes (one is split off alone, small ones share a
    piece): the piecewise step still equals the package's whole-tensor step."""
    run_pair(dict(weight_decay=0.1), steps=5, shapes=PIECE_SHAPES)


@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.01), dict(weight_decay=0.01, decouple=False,
                                                                 betas=(0.0, 0.99))], ids=["decoupled", "l2,b1=0"])
def test_compiled_passes_match_package(kwargs):
    """The compiled passes (the moments with their reductions returned by the kernel, then the descent) follow
    the package's float64 trajectory."""
    run_pair(kwargs, steps=6, compile=True)


def test_slice_p_keeps_s_and_p0_over_every_kth_entry_and_round_trips():
    """slice_p=k: s and p0 hold ceil(n/k) entries of each param (a complex param's whole entries), a state_dict
    continues the run bit for bit, and the compile switch leaves the (eager) numbers alone."""
    params = torch_params(PACKAGE_SHAPES)
    opt = Prodigy(params, slice_p=4)
    for t in range(3):
        set_smooth_grads(params, t)
        opt.step()
    for p, start in zip(params, torch_params(PACKAGE_SHAPES)):
        assert opt.state[p]["s"].shape == opt.state[p]["p0"].shape == ((p.numel() + 3) // 4,)
        assert torch.equal(opt.state[p]["p0"], start.detach().reshape(-1)[::4])
    twin = [p.detach().clone().requires_grad_() for p in params]
    resumed = Prodigy(twin, slice_p=4, compile=True)
    resumed.load_state_dict(opt.state_dict())
    continue_in_step(range(3, 6), (params, opt), (twin, resumed))

    z = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.complex128))
    opt = Prodigy([z], slice_p=2)
    z.grad = torch.randn_like(z)
    opt.step()
    assert opt.state[z]["s"].shape == (8,) and opt.state[z]["s"].is_complex()
