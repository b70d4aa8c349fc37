"""K-FAC: factors and preconditioned step equal dense Kronecker oracles; trajectory; engine checks on a model."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import steepest
from steepest.optim.kfac import KFAC

from .tiny_mlp import D, Net, data, train


def per_example_stats(model, x, y):
    """Dense factors from per-example activations and per-example output gradients (one backward each)."""
    a1, g1, a2, g2 = [], [], [], []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        s1 = model.fc1(xi)
        h = torch.tanh(s1)
        s2 = model.fc2(h)
        loss = F.cross_entropy(s2 * model.scale, y[i:i + 1])
        d1, d2 = torch.autograd.grad(loss, (s1, s2))
        a1.append(torch.cat([xi[0], torch.ones(1, dtype=D)]))
        a2.append(h[0].detach())
        g1.append(d1[0])
        g2.append(d2[0])
    outer = lambda vs: sum(torch.outer(v, v) for v in vs) / len(vs)  # noqa: E731
    return outer(a1), outer(g1), outer(a2), outer(g2)


def test_factors_equal_dense_per_example_kronecker_factors():
    model, (x, y) = Net(), data()
    A1, G1, A2, G2 = per_example_stats(model, x, y)
    opt = KFAC(model, lr=0.0, stat_decay=0.0, T_cov=1, T_inv=1, kl_clip=None)
    train(model, opt, 1, x, y)
    st1, st2 = opt.layer_state
    for got, want in ((st1["A"], A1), (st1["G"], G1), (st2["A"], A2), (st2["G"], G2)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def _dense_factors_inverse(A, G, damping, mode):
    na, ng = A.shape[0], G.shape[0]
    if mode == "eigen":
        return torch.linalg.inv(torch.kron(G, A) + damping * torch.eye(na * ng, dtype=D))
    pi = 1.0
    if mode == "pi":
        pi = math.sqrt((torch.trace(A) / na) / (torch.trace(G) / ng))
    r = math.sqrt(damping)
    return torch.kron(torch.linalg.inv(G + r / pi * torch.eye(ng, dtype=D)),
                      torch.linalg.inv(A + r * pi * torch.eye(na, dtype=D)))


@pytest.mark.parametrize("mode", ["sqrt", "pi", "eigen"])
def test_preconditioned_step_equals_dense_kronecker_inverse(mode):
    model, (x, y) = Net(), data()
    damping, lr = 1e-2, 0.1
    A1, G1, A2, G2 = per_example_stats(model, x, y)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    mat1 = torch.cat([model.fc1.weight.grad, model.fc1.bias.grad[:, None]], 1)
    mat2 = model.fc2.weight.grad.clone()
    before = [p.detach().clone() for p in (model.fc1.weight, model.fc1.bias, model.fc2.weight)]
    opt = KFAC(model, lr=lr, momentum=0.0, stat_decay=0.0, damping=damping, damping_mode=mode, T_cov=1, T_inv=1,
               kl_clip=None)
    train(model, opt, 1, x, y)
    v1 = (_dense_factors_inverse(A1, G1, damping, mode) @ mat1.reshape(-1)).reshape(mat1.shape)
    v2 = (_dense_factors_inverse(A2, G2, damping, mode) @ mat2.reshape(-1)).reshape(mat2.shape)
    torch.testing.assert_close(model.fc1.weight.detach(), before[0] - lr * v1[:, :4], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(model.fc1.bias.detach(), before[1] - lr * v1[:, 4], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(model.fc2.weight.detach(), before[2] - lr * v2, rtol=1e-10, atol=1e-13)


def oracle_trajectory(model, x, y, steps, lr, momentum, decay, damping, kl_clip, wd, t_cov, t_inv):
    """An independent float64 transcription: retain_grad() for the statistics, torch.kron + inv for the step."""
    W1, b1, W2, sc = (p.detach().clone() for p in (model.fc1.weight, model.fc1.bias, model.fc2.weight, model.scale))
    params = [W1, b1, W2, sc]
    bufs = [None] * 4
    A = [torch.eye(5, dtype=D), torch.eye(6, dtype=D)]
    G = [torch.eye(6, dtype=D), torch.eye(3, dtype=D)]
    inv = [None, None]
    out, nus = [], []
    n = x.shape[0]
    for t in range(steps):
        ps = [p.clone().requires_grad_(True) for p in params]
        s1 = x @ ps[0].t() + ps[1]
        s1.retain_grad()
        h = torch.tanh(s1)
        s2 = h @ ps[2].t()
        s2.retain_grad()
        F.cross_entropy(s2 * ps[3], y).backward()
        grads = [p.grad for p in ps]
        if t % t_cov == 0:
            acts = [torch.cat([x, torch.ones(n, 1, dtype=D)], 1), h.detach()]
            for k, (a, s) in enumerate(zip(acts, (s1, s2))):
                A[k] = decay * A[k] + (1 - decay) * a.t() @ a / n
                G[k] = decay * G[k] + (1 - decay) * n * s.grad.t() @ s.grad
        if t % t_inv == 0:
            inv = [_dense_factors_inverse(A[k], G[k], damping, "pi") for k in range(2)]
        mats = [torch.cat([grads[0], grads[1][:, None]], 1), grads[2]]
        vs = [(inv[k] @ mats[k].reshape(-1)).reshape(mats[k].shape) for k in range(2)]
        vg = sum(float((v * m).sum()) * lr**2 for v, m in zip(vs, mats))
        nu = min(1.0, math.sqrt(kl_clip / vg))
        nus.append(nu)
        new = [nu * vs[0][:, :4], nu * vs[0][:, 4], nu * vs[1], grads[3]]
        for k in range(4):
            d = new[k] + wd * params[k]
            bufs[k] = d.clone() if bufs[k] is None else momentum * bufs[k] + d
            params[k] = params[k] - lr * bufs[k]
        out.append([p.clone() for p in params])
    return out, nus


def test_trajectory_matches_float64_transcription():
    kw = dict(lr=0.5, momentum=0.9, decay=0.9, damping=3e-2, kl_clip=1e-2, wd=1e-3, t_cov=2, t_inv=3)
    model, (x, y) = Net(), data()
    want, nus = oracle_trajectory(model, x, y, 24, **kw)
    assert min(nus) < 0.6 and max(nus) == 1.0, "both the clipped and the unclipped branch are exercised"
    opt = KFAC(model, lr=kw["lr"], momentum=kw["momentum"], stat_decay=kw["decay"], damping=kw["damping"],
               kl_clip=kw["kl_clip"], weight_decay=kw["wd"], T_cov=kw["t_cov"], T_inv=kw["t_inv"])
    worst = 0.0
    for t in range(24):
        train(model, opt, 1, x, y)
        got = [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.scale]
        for a, b in zip(got, want[t]):
            torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)
            worst = max(worst, float(((a.detach() - b).abs() / b.abs().clamp(min=1e-12)).max()))
    assert worst < 1e-10


def test_conv_factors_equal_explicit_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=1, padding=1).to(D)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 16, 2).to(D))
    x = torch.randn(3, 2, 4, 4, dtype=D)
    opt = KFAC(model, lr=0.0, stat_decay=0.0, T_cov=1, T_inv=1, kl_clip=None)
    out = conv(x)
    out.retain_grad()
    loss = model[2](model[1](out)).pow(2).mean()
    loss.backward()
    opt.step()
    # Explicit patches: zero-padded input, one (in*3*3 + 1) vector per output position.
    xp = F.pad(x, (1, 1, 1, 1))
    rows = [torch.cat([xp[b, :, i:i + 3, j:j + 3].reshape(-1), torch.ones(1, dtype=D)])
            for b in range(3) for i in range(4) for j in range(4)]
    a = torch.stack(rows) / 16  # KFC as the authors: divided by the number of spatial positions
    A = a.t() @ a / 3
    g = out.grad.permute(0, 2, 3, 1).reshape(-1, 3) * 3 * 16
    G = g.t() @ g / g.shape[0]
    torch.testing.assert_close(opt.layer_state[0]["A"], A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.layer_state[0]["G"], G, rtol=1e-12, atol=1e-14)


def _classification(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    w = torch.randn(10, 4, generator=g)
    y = (torch.tanh(x @ w) + 0.1 * torch.randn(n, 4, generator=g)).argmax(1)
    return x, y


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))


def _steps_to(model, opt, x, y, target, max_steps):
    for t in range(1, max_steps + 1):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if F.cross_entropy(model(x), y).item() <= target:
            return t
    return max_steps + 1


def test_behaviour_reaches_adamw_loss_in_fewer_steps():
    """AdamW (lr 1e-2, 100 full-batch steps) vs K-FAC on a 10-32-4 tanh MLP; K-FAC needs ~33 steps."""
    x, y = _classification()
    model = _mlp()
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        adam.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adam.step()
    target = F.cross_entropy(model(x), y).item()
    model = _mlp()
    opt = KFAC(model, lr=0.3, momentum=0.9, damping=1e-2, kl_clip=1e-2, T_cov=1, T_inv=5)
    steps = _steps_to(model, opt, x, y, target, 100)
    assert steps <= 50, f"K-FAC needed {steps} steps to reach AdamW's 100-step loss {target:.4f}"


def _sd_round_trip(via):
    model, (x, y) = Net(), data()
    opt = KFAC(model, lr=0.05, T_cov=2, T_inv=3, stat_decay=0.9)
    train(model, opt, 4, x, y)
    sd = opt.state_dict()
    if via == "torch_save":
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    elif via == "deepcopy":
        sd = copy.deepcopy(sd)
    twin = Net()  # (a deepcopy of the model would copy opt's hooks too)
    twin.load_state_dict(model.state_dict())
    opt2 = KFAC(twin, lr=0.123, T_cov=2, T_inv=3, stat_decay=0.9)
    opt2.load_state_dict(sd)
    for _ in range(5):
        train(model, opt, 1, x, y)
        train(twin, opt2, 1, x, y)
    return model, twin


@pytest.mark.parametrize("via", ["direct", "torch_save", "deepcopy"])
def test_state_dict_round_trip_bit_for_bit(via):
    a, b = _sd_round_trip(via)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_foreign_state_dict_rejected_before_any_change():
    model, (x, y) = Net(), data()
    opt = KFAC(model, lr=0.05)
    train(model, opt, 1, x, y)
    before = str(opt.state_dict())
    other = nn.Sequential(nn.Linear(4, 7).to(D))
    o2 = KFAC(other, lr=0.05)
    with pytest.raises(ValueError, match="layer"):
        opt.load_state_dict(o2.state_dict())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="kfac"):
        opt.load_state_dict(sgd.state_dict())
    assert str(opt.state_dict()) == before


@pytest.mark.parametrize("bad", [dict(T_cov=0), dict(T_inv=1.5), dict(damping=0.0), dict(damping=-1.0),
                                 dict(kl_clip=0.0), dict(damping_mode="tikhonov"), dict(stat_decay=1.0),
                                 dict(lr=-1.0)])
def test_bad_hyperparameters_raise_before_any_change(bad):
    model = Net()
    key = next(iter(bad))
    with pytest.raises((ValueError, TypeError), match=key):
        KFAC(model, **bad)
    assert all(not m._forward_hooks for m in model.modules()), "no hook is left on the model"


def test_maximize_equals_negated_loss():
    (x, y) = data()
    a, b = Net(), Net()
    oa = KFAC(a, lr=0.05, T_cov=1, T_inv=2, maximize=True)
    ob = KFAC(b, lr=0.05, T_cov=1, T_inv=2)
    train(a, oa, 6, x, y, sign=-1.0)
    train(b, ob, 6, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


def test_skip_nonfinite_changes_nothing():
    model, (x, y) = Net(), data()
    opt = KFAC(model, lr=0.05, T_cov=1, T_inv=1, skip_nonfinite=True)
    train(model, opt, 2, x, y)
    sd = copy.deepcopy(opt.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert str(opt.state_dict()) == str(sd)
    assert all(not layer.pending_a and not layer.pending_g for layer in opt.layers)


def test_zero_gradient_and_rank_one_batch_give_no_nan():
    model, (x, y) = Net(), data()
    opt = KFAC(model, lr=0.05, T_cov=1, T_inv=1, stat_decay=0.0, damping=1e-6, damping_mode="pi")
    for _ in range(3):
        opt.zero_grad()
        (0.0 * model(x).sum()).backward()  # zero output gradients: G = 0, pi's trace ratio undefined
        opt.step()
    for _ in range(3):  # one example repeated: A and G of rank 1
        opt.zero_grad()
        F.cross_entropy(model(x[:1].repeat(8, 1)), y[:1].repeat(8)).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for st in opt.layer_state for v in st.values())


def test_nonfinite_factor_statistics_are_skipped_with_a_warning():
    model, (x, y) = Net(), data()
    opt = KFAC(model, lr=0.05, T_cov=1, T_inv=1, stat_decay=0.5)
    train(model, opt, 1, x, y)
    A_before = opt.layer_state[0]["A"].clone()
    bad = x.clone()
    bad[0, 0] = float("nan")
    model(bad)  # a stray forward pass on bad data (no backward): its A statistics are not finite
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="A statistics of layer") as record:
        opt.step()
    assert {str(w.message).split(" (")[0] for w in record} == {
        "KFAC: the A statistics of layer 0", "KFAC: the A statistics of layer 1"}
    assert torch.equal(opt.layer_state[0]["A"], A_before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(opt.layer_state[0]["G"], torch.eye(6, dtype=D))


def test_parameter_list_warns_and_is_sgd_momentum():
    model, twin, (x, y) = Net(), Net(), data()
    with pytest.warns(UserWarning, match="not the model"):
        opt = KFAC(list(model.parameters()), lr=0.05, momentum=0.9, weight_decay=1e-3)
    ref = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    train(model, opt, 5, x, y)
    train(twin, ref, 5, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


def test_float32_and_bfloat16_models_run():
    for dtype in (torch.float32, torch.bfloat16):
        model, (x, y) = Net(dtype=dtype), data(dtype=dtype)
        opt = KFAC(model, lr=0.05, T_cov=1, T_inv=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            train(model, opt, 3, x, y)
        assert all(p.dtype == dtype and torch.isfinite(p.float()).all() for p in model.parameters())
        assert all(v.dtype == torch.float32 for st in opt.layer_state for v in st.values())


@pytest.mark.parametrize("name", ["kfac", "mkor"])
def test_deepcopy_of_model_and_optimizer_hooks_the_copy_to_the_copy(name):
    """copy.deepcopy((model, opt)): the copied model's hooks feed the copied optimizer, so the two pairs train
    identically and stepping the copy leaves the original's statistics alone."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    cls = steepest.get(name).cls
    opt = cls(m, lr=0.1, **({"T_inv": 3, "T_cov": 1} if name == "kfac" else {"inv_freq": 2}))
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def step(model, o):
        o.zero_grad()
        F.mse_loss(model(x), y).backward()
        o.step()

    step(m, opt)
    m2, opt2 = copy.deepcopy((m, opt))
    steps_before = opt.layer_steps
    step(m2, opt2)
    assert opt.layer_steps == steps_before and opt2.layer_steps == steps_before + 1
    assert all(not layer.pending_a for layer in opt.layers)
    step(m, opt)
    for _ in range(10):
        step(m, opt)
        step(m2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


@pytest.mark.parametrize("name", ["kfac", "mkor"])
def test_step_inside_a_callers_autocast_block(name):
    """A loop written as one torch.autocast block (its forward and backward in float32 here, so that both runs
    take the same gradients): the step (factor updates, inverses, preconditioning) runs outside the autocast
    region and the model trains exactly as without the block (autocast would take its products to bfloat16)."""
    cls = steepest.get(name).cls
    kwargs = {"T_inv": 2, "T_cov": 1} if name == "kfac" else {"inv_freq": 1}

    def run(autocast):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        opt = cls(m, lr=0.1, **kwargs)
        x, y = torch.randn(32, 5), torch.randn(32, 3)
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                opt.zero_grad()
                with torch.autocast("cpu", enabled=False):
                    F.mse_loss(m(x), y).backward()
                opt.step()
        return list(m.parameters())

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_factor_statistics_ignore_autocast():
    """input_covariance and output_grad_covariance called inside an autocast region (a forward or backward hook
    of an autocast forward) return what they return outside it: float32 products of the float32 values."""
    from steepest.optim.kfac import Layer, input_covariance, output_grad_covariance

    torch.manual_seed(0)
    layer = Layer(torch.nn.Linear(7, 5))
    x, g = torch.randn(64, 7), torch.randn(64, 5)
    want = input_covariance(layer, x, torch.float32), output_grad_covariance(layer, g, torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = input_covariance(layer, x, torch.float32), output_grad_covariance(layer, g, torch.float32, True)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("name", ["kfac", "mkor"])
def test_lazy_model_is_refused_until_its_first_forward(name):
    """Layers hooked by type: a LazyLinear is no nn.Linear before its first forward, so a model built lazily is
    refused (naming the module and the fix) instead of stepping every layer with the fallback; after one forward
    the same model is hooked whole."""
    cls = steepest.get(name).cls
    model = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.Tanh(), torch.nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"lazy modules .*'0', '2'.*forward pass"):
        cls(model, lr=0.1)
    model(torch.randn(4, 5))
    assert len(cls(model, lr=0.1).layers) == 2
