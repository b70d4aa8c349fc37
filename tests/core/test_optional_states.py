"""States a param group uses only under some hyperparameters (``Optimizer.optional_states``): a hyperparameter
changed between steps (a schedule) creates the state at the next step, or leaves it unused, and state_dicts with or
without it load. SGD's case is checked against torch.optim.SGD in tests/optim/test_torch_equivalents.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import steepest

SHAPES = [(9, 7), (13,)]


def _grads(params, t):
    """A smooth non-quadratic loss's gradient at the current point, changing with the step (float64)."""
    out = []
    for i, p in enumerate(params):
        x = p.detach()
        scale = torch.linspace(0.5, 2.0 + i, x.numel(), dtype=x.dtype).reshape(x.shape)
        out.append(2 * scale * (x - 0.3) + 0.3 * torch.cos(3 * x + 0.1 * t))
    return out


def _start():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def _run(make, changes, steps=14, reload_at=None):
    """Params after ``steps`` steps of ``make(params)``; its groups updated with changes[t] after step t; with
    ``reload_at``, a new optimizer loads a deep copy of the state_dict before that step."""
    params = [torch.nn.Parameter(x.clone()) for x in _start()]
    opt = make(params)
    for t in range(steps):
        if t == reload_at:
            saved = copy.deepcopy(opt.state_dict())
            opt = make(params)
            opt.load_state_dict(saved)
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        if getattr(opt, "needs_closure", False) or isinstance(opt, steepest.XGrad):
            opt.step(lambda: torch.tensor(0.0))
        else:
            opt.step()
        for group in opt.param_groups:
            group.update(changes.get(t, {}))
    return [p.detach() for p in params]


AMSGRAD_SCHEDULE = {2: dict(amsgrad=True), 7: dict(amsgrad=False), 10: dict(amsgrad=True)}


def _adam_transcription(lr, betas, eps, schedule, steps=14):
    """Adam with amsgrad switched by ``schedule`` (float64): the running max starts at the first step that uses it
    (the max over no earlier v is this v) and is kept, not updated, while amsgrad is off."""
    b1, b2 = betas
    xs = [torch.nn.Parameter(x.clone()) for x in _start()]
    m = [torch.zeros_like(x) for x in xs]
    v = [torch.zeros_like(x) for x in xs]
    vmax: list[torch.Tensor | None] = [None for _ in xs]
    amsgrad = False
    for t in range(steps):
        k = t + 1
        for i, g in enumerate(_grads(xs, t)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            if amsgrad:
                vmax[i] = v[i] if vmax[i] is None else torch.maximum(vmax[i], v[i])
            second = vmax[i] if amsgrad else v[i]
            denom = second.sqrt() / math.sqrt(1 - b2**k) + eps
            with torch.no_grad():
                xs[i] -= lr / (1 - b1**k) * m[i] / denom
        amsgrad = schedule.get(t, {}).get("amsgrad", amsgrad)
    return [x.detach() for x in xs]


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "fused"])
def test_adam_amsgrad_switched_between_steps_follows_the_transcription(compile_):
    want = _adam_transcription(0.05, (0.9, 0.99), 1e-8, AMSGRAD_SCHEDULE)
    for reload_at in (None, 5, 9):
        got = _run(lambda ps: steepest.Adam(ps, lr=0.05, betas=(0.9, 0.99), compile=compile_), AMSGRAD_SCHEDULE,
                   reload_at=reload_at)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# Each: the method, its options, a schedule switching an optional state on and off.
SWITCHES = [
    ("adamw", dict(lr=1e-2), AMSGRAD_SCHEDULE),
    ("ademamix", dict(lr=1e-2, betas=(0.0, 0.999, 0.999)), {2: dict(betas=(0.9, 0.999, 0.999)),
                                                             7: dict(betas=(0.0, 0.999, 0.999))}),
    ("prodigy", dict(lr=1.0, betas=(0.0, 0.99)), {2: dict(betas=(0.9, 0.99)), 7: dict(betas=(0.0, 0.99))}),
    ("mfac", dict(lr=1e-2, ngrads=4), {2: dict(momentum=0.9), 7: dict(momentum=0.0), 10: dict(momentum=0.5)}),
    ("xgrad", dict(base="adam", lr=1e-2), AMSGRAD_SCHEDULE),
]


@pytest.mark.parametrize("name, kwargs, changes", SWITCHES, ids=[s[0] for s in SWITCHES])
def test_optional_state_switched_between_steps(name, kwargs, changes):
    """The state appears when the option turns on and stays, unused, when it turns off; eager and fused steps
    agree, and a state_dict taken with or without the state continues the same run."""
    cls = steepest.get(name).cls
    eager = _run(lambda ps: cls(ps, compile=False, **kwargs), changes)
    params = [torch.nn.Parameter(x.clone()) for x in _start()]
    probe = cls(params, compile=False, **kwargs)
    optional = next(iter(probe.optional_states))
    for t in range(4):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        probe.step(lambda: torch.tensor(0.0)) if isinstance(probe, steepest.XGrad) else probe.step()
        assert (optional in probe.state[params[0]]) == (t >= 3), t
        for group in probe.param_groups:
            group.update(changes.get(t, {}))
    runs = {"fused": _run(lambda ps: cls(ps, compile=True, **kwargs), changes)}
    for at in (2, 5, 9):
        runs[f"reloaded before step {at}"] = _run(lambda ps: cls(ps, compile=False, **kwargs), changes, reload_at=at)
    for label, got in runs.items():
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, label=label: f"{label}: {m}")


def test_state_dict_with_a_foreign_state_still_raises():
    """Optional states widen what loads by exactly those keys: another key still names the mismatch."""
    params = [torch.nn.Parameter(x.clone()) for x in _start()]
    opt = steepest.SGD(params, lr=0.1, momentum=0.9)
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"] = torch.zeros(SHAPES[0], dtype=torch.float64)
    fresh = steepest.SGD(params, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="exp_avg"):
        fresh.load_state_dict(saved)
    assert not fresh.state
    wrong_shape = opt.state_dict()
    wrong_shape["state"][0] = {"step": 1, "momentum_buffer": torch.zeros(3, dtype=torch.float64)}
    wrong_shape["param_groups"][0]["momentum"] = 0.0
    with pytest.raises(ValueError, match="momentum_buffer"):
        fresh.load_state_dict(wrong_shape)
    assert not fresh.state


def test_xgrad_sgd_refuses_a_momentum_set_to_zero_before_any_change():
    params = [torch.nn.Parameter(x.clone()) for x in _start()]
    opt = steepest.XGrad(params, base="sgd", lr=0.1, momentum=0.9)
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    opt.step(lambda: torch.tensor(0.0))
    opt.param_groups[0]["momentum"] = 0.0
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="momentum"):
        opt.step(lambda: torch.tensor(0.0))
    for a, b in zip(params, before):
        assert torch.equal(a, b)
