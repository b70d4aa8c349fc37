"""State_dicts of the authors' PyPI packages load into steepest's optimizers and continue the package's run
(a user switching libraries mid-training keeps their checkpoint). Oracle: the package itself, stepping on."""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch

import steepest
from steepest.optim.qh import _steps_from_weight

from .trajectory import PACKAGE_SHAPES, set_smooth_grads, torch_params

lion_pytorch = pytest.importorskip("lion_pytorch")
adamp = pytest.importorskip("adamp")
qhoptim = pytest.importorskip("qhoptim.pyt")
schedulefree = pytest.importorskip("schedulefree")
prodigyopt = pytest.importorskip("prodigyopt")
dadaptation = pytest.importorskip("dadaptation")

CASES = {
    # name: (the package's optimizer, the keyword arguments both take)
    "prodigy": (lambda ps, **kw: prodigyopt.Prodigy(ps, **kw), dict(weight_decay=0.01)),  # s, p0 flattened
    "prodigy-slice_p=3": (lambda ps, **kw: prodigyopt.Prodigy(ps, **kw), dict(slice_p=3, betas=(0.0, 0.99))),
    "dadapt_adam": (lambda ps, **kw: dadaptation.DAdaptAdam(ps, **kw), dict(weight_decay=0.01, decouple=True)),
    "dadapt_sgd": (lambda ps, **kw: dadaptation.DAdaptSGD(ps, **kw), dict(momentum=0.9, weight_decay=0.01)),
    "lion": (lambda ps, **kw: lion_pytorch.Lion(ps, **kw), dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)),
    "adamp": (lambda ps, **kw: adamp.AdamP(ps, **kw), dict(lr=1e-2, weight_decay=0.1)),
    "sgdp": (lambda ps, **kw: adamp.SGDP(ps, **kw), dict(lr=1e-2, momentum=0.9, weight_decay=0.1)),
    "qhm": (lambda ps, **kw: qhoptim.QHM(ps, **kw), dict(lr=1e-2, momentum=0.9, nu=0.7)),
    "qhadam": (lambda ps, **kw: qhoptim.QHAdam(ps, **kw), dict(lr=1e-2, betas=(0.9, 0.99), nus=(0.7, 1.0),
                                                            weight_decay=0.01)),
    "adamw_schedulefree": (lambda ps, **kw: schedulefree.AdamWScheduleFree(ps, **kw),
                           dict(lr=1e-2, warmup_steps=3, weight_decay=0.01)),
    "sgd_schedulefree": (lambda ps, **kw: schedulefree.SGDScheduleFree(ps, **kw), dict(lr=1e-2, warmup_steps=3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_package_checkpoint_loads_and_continues_the_packages_run(name):
    """Saved after 6 of the package's steps (its state names, no per-param step counts where it keeps none,
    qhoptim's bias-correction weights in place of a count, prodigyopt's flattened s and p0, dadaptation's groups
    without d0 and DAdaptSGD's z), loaded here, and 10 more steps of each on the same gradients: equal to rounding
    (float64), as the uninterrupted runs are."""
    make, kwargs = CASES[name]
    theirs_params, ours_params = torch_params(PACKAGE_SHAPES), torch_params(PACKAGE_SHAPES)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = make(theirs_params, **kwargs)
    if hasattr(theirs, "train"):  # schedule-free: steps only in train mode
        theirs.train()
    for t in range(6):
        set_smooth_grads(theirs_params, t)
        theirs.step()
    with torch.no_grad():
        for p, q in zip(ours_params, theirs_params):
            p.copy_(q)
    ours = steepest.get(name.split("-")[0]).cls(ours_params, **kwargs)
    if hasattr(ours, "train"):
        ours.train()
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert all(ours.state[p]["step"] >= 1 for p in ours_params)
    for t in range(6, 16):
        for params, opt in ((theirs_params, theirs), (ours_params, ours)):
            set_smooth_grads(params, t)
            opt.step()
        for x, y in zip(ours_params, theirs_params):
            torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.9, 0.99, 0.999])
@pytest.mark.parametrize("t", [1, 2, 7, 100, 3000])
def test_step_count_read_back_from_qhoptims_weight(beta, t):
    """qhoptim's weight after t steps, w = sum_{i<t} beta^i built as it builds it, gives back t, or, where beta^t is
    below what w resolves, a count whose bias correction (1 - beta) / (1 - beta^t) is the same to rounding."""
    weight = 0.0
    for _ in range(t):
        weight = 1.0 + beta * weight
    got = _steps_from_weight(weight, beta)
    if beta**t > 1e-9:
        assert got == t
    assert (1 - beta) / (1 - beta**got) == pytest.approx(1 / weight, rel=1e-9)
    assert _steps_from_weight(1.0, 0.0) == 1 and _steps_from_weight(1.0, beta) == 1
    assert math.isfinite(_steps_from_weight(1 / (1 - beta), beta))
