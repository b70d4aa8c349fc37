"""The torch schedulers: LRs set on any optimizer, resume via state_dict, errors, and 1cycle vs torch."""

import io

import numpy as np
import pytest
import torch

from steepest import schedules as S


def _opt(kind="sgd", groups=1, lr=0.1):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(groups)]
    spec = [{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)]
    if kind == "sgd":
        return torch.optim.SGD(spec, lr=lr, momentum=0.9)
    if kind == "adamw":
        return torch.optim.AdamW(spec, lr=lr)
    return torch.optim.Adagrad(spec, lr=lr)


def _run(opt, sched, n):
    lrs = []
    for _ in range(n):
        lrs.append([g["lr"] for g in opt.param_groups])
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    return np.array(lrs)


FACTORIES = {
    "cosine": (lambda o: S.cosine(o, warmup=10, total=100, final_lr_ratio=0.1),
               S.Cosine(total=100, warmup=10, final_lr_ratio=0.1)),
    "linear_decay": (lambda o: S.linear_decay(o, warmup=5, total=100), S.LinearDecay(total=100, warmup=5)),
    "inverse_sqrt": (lambda o: S.inverse_sqrt(o, warmup=10), S.InverseSqrt(warmup=10)),
    "wsd": (lambda o: S.wsd(o, warmup=10, total=100, decay=0.3, shape="cosine"),
            S.WSD(total=100, warmup=10, decay=0.3, shape="cosine")),
    "warmup": (lambda o: S.linear_warmup(o, warmup=20), S.Warmup(warmup=20)),
    "constant": (lambda o: S.constant(o), S.Constant()),
}


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("kind", ["sgd", "adamw", "adagrad"])
def test_scheduler_sets_base_lr_times_multiplier(name, kind):
    make, shape = FACTORIES[name]
    opt = _opt(kind, groups=2)
    sched = make(opt)
    lrs = _run(opt, sched, 120)
    mult = np.array([shape(t) for t in range(120)])
    np.testing.assert_allclose(lrs[:, 0], 0.1 * mult, rtol=1e-15, atol=0)
    np.testing.assert_allclose(lrs[:, 1], 0.2 * mult, rtol=1e-15, atol=0)
    assert sched.lr_multiplier(57) == shape(57)


def test_design_md_call_shape():
    opt = _opt("adamw")
    sched = S.wsd(opt, warmup=500, total=20_000, decay=0.2, shape="1-sqrt")
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert sched.lr_multiplier(500) == 1.0 and sched.lr_multiplier(20_000) == 0.0


@pytest.mark.parametrize("name", list(FACTORIES))
def test_resume_is_exact(name):
    make, _ = FACTORIES[name]
    opt_a = _opt("adamw")
    sched_a = make(opt_a)
    full = _run(opt_a, sched_a, 80)

    opt_b = _opt("adamw")
    sched_b = make(opt_b)
    _run(opt_b, sched_b, 30)
    buf = io.BytesIO()
    torch.save({"opt": opt_b.state_dict(), "sched": sched_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # the state holds only plain types
    opt_c = _opt("adamw")
    sched_c = make(opt_c)
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    rest = _run(opt_c, sched_c, 50)
    np.testing.assert_array_equal(rest, full[30:])


@pytest.mark.parametrize("changed,name", [
    (lambda o: S.cosine(o, warmup=10, total=200, final_lr_ratio=0.1), "total"),
    (lambda o: S.cosine(o, warmup=20, total=100, final_lr_ratio=0.1), "warmup"),
    (lambda o: S.cosine(o, warmup=10, total=100, final_lr_ratio=0.2), "final_lr_ratio"),
    (lambda o: S.wsd(o, warmup=10, total=100), "schedule"),
])
def test_resume_with_changed_schedule_raises_naming_argument(changed, name):
    opt = _opt()
    sched = S.cosine(opt, warmup=10, total=100, final_lr_ratio=0.1)
    _run(opt, sched, 5)
    state = sched.state_dict()
    other = changed(_opt())
    before = dict(other.__dict__)
    with pytest.raises(ValueError, match=rf"^{name}"):
        other.load_state_dict(state)
    assert other.last_epoch == before["last_epoch"] and other.schedule is before["schedule"]


def test_resume_with_changed_one_cycle_total_raises():
    sched = S.one_cycle(_opt(), total=100, max_lr=1.0)
    with pytest.raises(ValueError, match="^total"):
        S.one_cycle(_opt(), total=120, max_lr=1.0).load_state_dict(sched.state_dict())


def test_join_resume_names_nested_argument():
    def make(total):
        return S.from_schedule(_opt(), S.Join([S.Warmup(warmup=5), S.Cosine(total=total)], [5]))
    with pytest.raises(ValueError, match=r"^schedules\[1\]\.total"):
        make(60).load_state_dict(make(50).state_dict())


def test_works_inside_torch_sequential_lr():
    opt = _opt()
    a = S.linear_warmup(opt, warmup=10)
    b = S.cosine(opt, total=50)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [a, b], milestones=[10])
    lrs = _run(opt, seq, 60)[:, 0]
    expect = [0.1 * (t / 10 if t < 10 else S.Cosine(total=50)(t - 10)) for t in range(60)]
    np.testing.assert_allclose(lrs, expect, rtol=1e-15)


def test_bad_input_raises_before_touching_the_optimizer():
    opt = _opt()
    snapshot = [dict(g) for g in opt.param_groups]
    for call, name in [(lambda: S.cosine(opt, warmup=200, total=100), "warmup"),
                       (lambda: S.wsd(opt, total=0), "total"),
                       (lambda: S.linear_decay(opt, total=-3), "total"),
                       (lambda: S.wsd(opt, total=100, decay=-0.5), "decay"),
                       (lambda: S.one_cycle(opt, total=0, max_lr=1.0), "total"),
                       (lambda: S.one_cycle(opt, total=100, max_lr=1.0, pct_start=1.5), "pct_start"),
                       (lambda: S.one_cycle(opt, total=2, max_lr=1.0, pct_start=0.3), "pct_start"),
                       (lambda: S.one_cycle(opt, total=100, max_lr=-1.0), "max_lr"),
                       (lambda: S.one_cycle(torch.optim.Rprop([torch.nn.Parameter(torch.zeros(1))]), total=10,
                                            max_lr=1.0), "cycle_momentum")]:
        with pytest.raises(ValueError, match=name):
            call()
        assert [dict(g) for g in opt.param_groups] == snapshot
    with pytest.raises(TypeError, match="optimizer"):
        S.cosine("not an optimizer", total=10)


# ------------------------------------------------------------------------------------- 1cycle oracle

ONE_CYCLE_CASES = [
    dict(),
    dict(anneal_strategy="linear"),
    dict(three_phase=True),
    dict(pct_start=0.25, div_factor=10.0, final_div_factor=100.0),
    dict(cycle_momentum=False),
    dict(base_momentum=0.8, max_momentum=0.9, three_phase=True, anneal_strategy="linear"),
]


@pytest.mark.parametrize("kwargs", ONE_CYCLE_CASES)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("total", [100, 37])
def test_one_cycle_matches_torch_exactly(kwargs, kind, total):
    opt_t, opt_s = _opt(kind, groups=2), _opt(kind, groups=2)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt_t, max_lr=[1.0, 0.3], total_steps=total, **kwargs)
    ours = S.one_cycle(opt_s, max_lr=[1.0, 0.3], total=total, **kwargs)
    key = "betas" if kind == "adamw" else "momentum"
    for _ in range(total):  # torch allows total - 1 scheduler steps after the first LR
        assert [g["lr"] for g in opt_s.param_groups] == [g["lr"] for g in opt_t.param_groups]
        assert [g[key] for g in opt_s.param_groups] == [g[key] for g in opt_t.param_groups]
        for o in (opt_t, opt_s):
            for g in o.param_groups:
                g["params"][0].grad = torch.ones(3)
            o.step()
        ref.step()
        ours.step()
    assert ours.get_last_lr() == ref.get_last_lr()


def test_one_cycle_pure_function_and_default_max_lr():
    opt = _opt("sgd", lr=0.5)
    sched = S.one_cycle(opt, total=50)  # max_lr defaults to the optimizer's lr
    lrs = _run(opt, sched, 50)[:, 0]
    expect = [S.one_cycle_lr(t, total=50, max_lr=0.5) for t in range(50)]
    assert list(lrs) == expect
    assert max(expect) == pytest.approx(0.5) and expect[0] == pytest.approx(0.5 / 25)
    assert sched.lr_multiplier(14) == pytest.approx(1.0)  # peak at pct_start*total - 1
    assert expect[-1] == pytest.approx(0.5 / 25 / 1e4)


def test_one_cycle_resume_is_exact():
    def make(o):
        return S.one_cycle(o, total=60, max_lr=1.0)
    opt_a = _opt("adamw")
    full = _run(opt_a, make(opt_a), 60)
    opt_b = _opt("adamw")
    sched_b = make(opt_b)
    _run(opt_b, sched_b, 25)
    opt_c = _opt("adamw")
    sched_c = make(opt_c)
    opt_c.load_state_dict(opt_b.state_dict())
    sched_c.load_state_dict(sched_b.state_dict())
    np.testing.assert_array_equal(_run(opt_c, sched_c, 35), full[25:])
    assert opt_c.param_groups[0]["betas"] == opt_a.param_groups[0]["betas"]
