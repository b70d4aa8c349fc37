"""SGD, Adam and AdamW against torch.optim's own implementations: trajectories step for step, and defaults."""

from __future__ import annotations

import inspect

import pytest
import torch

import steepest

SHAPES = [(40, 30), (17,), (5, 4, 2), (300,)]
STEPS = 25

CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, maximize=True)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, amsgrad=True)),
    ("Adam", dict(lr=1e-2, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)),
]


def run(make_opt, dtype, steps=STEPS):
    """Params of SHAPES in dtype after ``steps`` steps of a smooth non-quadratic loss's gradient that changes with
    the step (computed in float64 from the current point, then cast)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]
    opt = make_opt(params)
    for t in range(steps):
        for i, p in enumerate(params):
            x = p.detach().double()
            scale = torch.linspace(0.5, 2.0 + i, p.numel(), dtype=torch.float64).reshape(p.shape)
            p.grad = (2 * scale * (x - 0.3) + 0.3 * torch.cos(3 * x + 0.1 * t)).to(dtype)
        opt.step()
    return params


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("name, kwargs", CASES)
def test_eager_trajectory_equals_torch_optim(name, kwargs, dtype, rtol):
    ours = run(lambda ps: getattr(steepest, name)(ps, compile=False, **kwargs), dtype)
    theirs = run(lambda ps: getattr(torch.optim, name)(ps, foreach=False, **kwargs), dtype)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("name, kwargs", [CASES[3], CASES[6], CASES[8], CASES[10]])
def test_fused_trajectory_equals_torch_optim(name, kwargs):
    ours = run(lambda ps: getattr(steepest, name)(ps, compile=True, **kwargs), torch.float32)
    theirs = run(lambda ps: getattr(torch.optim, name)(ps, foreach=False, **kwargs), torch.float32)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_defaults_are_torch_optims(name):
    """A swap of torch.optim.X(params, lr=...) for steepest.X keeps every other hyperparameter."""
    ours = inspect.signature(getattr(steepest, name).__init__).parameters
    theirs = inspect.signature(getattr(torch.optim, name).__init__).parameters
    shared = [k for k in theirs if k in ours and k not in ("self", "params")]
    assert {"lr", "weight_decay", "maximize"} <= set(shared)
    for key in shared:
        assert ours[key].default == theirs[key].default, key


@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
@pytest.mark.parametrize("name, kwargs", [CASES[0], CASES[2], CASES[3], CASES[6], CASES[8], CASES[10]])
def test_state_dict_moves_between_torch_optim_and_steepest(name, kwargs, direction):
    """Three steps by one, a state_dict, three more by the other: the run of torch.optim alone (torch.optim.SGD
    counts no steps and keeps no buffer without momentum; its state_dict loads all the same)."""
    ours, theirs = getattr(steepest, name), getattr(torch.optim, name)
    first, second = (theirs, ours) if direction == "from_torch" else (ours, theirs)
    want = run(lambda ps: theirs(ps, **kwargs), torch.float64, steps=6)

    got = run(lambda ps: _Handover(first(ps, **kwargs), lambda: second(ps, **kwargs)), torch.float64, steps=6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class _Handover:
    """Steps ``opt`` three times, then hands its state_dict to the optimizer ``make()`` builds and steps that."""

    def __init__(self, opt, make):
        self.opt, self.make, self.steps = opt, make, 0

    def step(self):
        if self.steps == 3:
            nxt = self.make()
            nxt.load_state_dict(self.opt.state_dict())
            self.opt = nxt
        self.opt.step()
        self.steps += 1


def test_adam_decoupled_weight_decay_per_group_and_older_state_dicts():
    """decoupled_weight_decay is a group option as in torch.optim.Adam (one group each way gives torch's two
    optimizers' runs), and a state_dict written before the option existed loads as L2 decay."""
    kw = dict(lr=1e-2, weight_decay=0.1)

    def two_groups(make):
        def build(ps):
            return make([{"params": ps[:2], "decoupled_weight_decay": True}, {"params": ps[2:]}], **kw)
        return build

    ours = run(two_groups(lambda groups, **k: steepest.Adam(groups, compile=False, **k)), torch.float64)
    theirs = run(two_groups(lambda groups, **k: torch.optim.Adam(groups, foreach=False, **k)), torch.float64)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    params = [torch.nn.Parameter(torch.ones(3))]
    opt = steepest.Adam(params, compile=False, **kw)
    params[0].grad = torch.ones(3)
    opt.step()
    old = opt.state_dict()
    del old["param_groups"][0]["decoupled_weight_decay"]
    fresh = steepest.Adam(params, compile=False, decoupled_weight_decay=True, **kw)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["decoupled_weight_decay"] is False
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        steepest.Adam(params, decoupled_weight_decay="yes")


class _Schedule:
    """Steps ``opt``, updating its param groups with ``changes[t]`` after step t (a hyperparameter schedule)."""

    def __init__(self, opt, changes):
        self.opt, self.changes, self.steps = opt, changes, 0

    def step(self):
        self.opt.step()
        for group in self.opt.param_groups:
            group.update(self.changes.get(self.steps, {}))
        self.steps += 1


SGD_SCHEDULES = [
    (dict(lr=0.05), {3: dict(momentum=0.9)}),
    (dict(lr=0.05, weight_decay=1e-2, maximize=True), {3: dict(momentum=0.9, dampening=0.5)}),
    (dict(lr=0.05), {3: dict(momentum=0.9, nesterov=True)}),
    (dict(lr=0.05, momentum=0.9, dampening=0.3), {3: dict(momentum=0.0), 8: dict(momentum=0.8)}),
]


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("kwargs, changes", SGD_SCHEDULES)
def test_sgd_momentum_schedule_equals_torch_optim(kwargs, changes, compile_):
    """Momentum changed between steps, from 0 (the buffer starts as b = g at its first use) and to 0 (a plain step,
    the buffer kept for later), as torch.optim.SGD does."""
    ours = run(lambda ps: _Schedule(steepest.SGD(ps, compile=compile_, **kwargs), changes), torch.float64)
    theirs = run(lambda ps: _Schedule(torch.optim.SGD(ps, foreach=False, **kwargs), changes), torch.float64)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
@pytest.mark.parametrize("kwargs, changes", [SGD_SCHEDULES[0], SGD_SCHEDULES[3]])
def test_sgd_state_dict_after_a_momentum_change_moves_between_torch_and_steepest(kwargs, changes, direction):
    """A state_dict written after momentum changed (a buffer under momentum 0, or none under momentum 0.9)
    loads both ways and continues torch.optim.SGD's run."""
    first, second = (torch.optim.SGD, steepest.SGD) if direction == "from_torch" else (steepest.SGD, torch.optim.SGD)
    want = run(lambda ps: _Schedule(torch.optim.SGD(ps, **kwargs), changes), torch.float64, steps=12)

    def handover(ps):
        return _HandoverAt(_Schedule(first(ps, **kwargs), changes), lambda: second(ps, **kwargs), at=6)

    got = run(handover, torch.float64, steps=12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class _HandoverAt:
    """Steps a schedule; before step ``at`` its optimizer's state_dict goes to a new one ``make()`` builds."""

    def __init__(self, sched, make, at):
        self.sched, self.make, self.at = sched, make, at

    def step(self):
        if self.sched.steps == self.at:
            nxt = self.make()
            nxt.load_state_dict(self.sched.opt.state_dict())
            self.sched.opt = nxt
        self.sched.step()
