"""LR scaling rules and the adaptive batch size (norm test) on a noisy quadratic with a closed form."""

import math

import numpy as np
import pytest
import torch

from steepest import schedules as S


def test_scaling_rules_closed_form():
    assert S.scale_lr(0.1, base_batch_size=256, batch_size=8192) == pytest.approx(0.1 * 32)  # Goyal et al.
    assert S.scale_lr(1e-3, base_batch_size=256, batch_size=1024, rule="sqrt") == pytest.approx(2e-3)
    assert S.scale_lr(1e-3, base_batch_size=1024, batch_size=256, rule="sqrt") == pytest.approx(5e-4)
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert S.scale_lr(1.0, base_batch_size=1, batch_size=4, rule="auto", optimizer=torch.optim.AdamW(p)) == 2.0
    assert S.scale_lr(1.0, base_batch_size=1, batch_size=4, rule="auto", optimizer=torch.optim.SGD(p, lr=1)) == 4.0
    assert S.scaling_rule(torch.optim.Adam(p)) == "sqrt" and S.scaling_rule(torch.optim.SGD(p, lr=1)) == "linear"


def test_malladi_adam_rule():
    out = S.scale_adam_hyperparameters(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, base_batch_size=256, batch_size=1024)
    assert out["lr"] == pytest.approx(2e-3)
    assert out["betas"] == pytest.approx((0.6, 0.996))
    assert out["eps"] == pytest.approx(5e-9)
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        S.scale_adam_hyperparameters(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, base_batch_size=1, batch_size=20)


@pytest.mark.parametrize("call,name", [
    (lambda: S.scale_lr(0.1, base_batch_size=0, batch_size=4), "base_batch_size"),
    (lambda: S.scale_lr(0.1, base_batch_size=2, batch_size=-4), "batch_size"),
    (lambda: S.scale_lr(0.1, base_batch_size=2, batch_size=4, rule="cubic"), "rule"),
    (lambda: S.scale_lr(0.1, base_batch_size=2, batch_size=4, rule="auto"), "optimizer"),
    (lambda: S.AdaptiveBatchSize(0, eta=0.5), "batch_size"),
    (lambda: S.AdaptiveBatchSize(8, eta=-1.0), "eta"),
    (lambda: S.AdaptiveBatchSize(8, eta=0.5, max_batch_size=4), "max_batch_size"),
    (lambda: S.AdaptiveBatchSize(8, eta=0.5).update(torch.zeros(1, 3)), "grads"),
])
def test_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_norm_test_is_the_papers_formula():
    torch.manual_seed(0)
    rows = torch.randn(16, 7, dtype=torch.float64) + 0.3
    nt = S.AdaptiveBatchSize(16, eta=0.4)
    res = nt.test(rows)
    mean = rows.mean(0)
    s2 = float(((rows - mean) ** 2).sum()) / 15
    assert res.variance == pytest.approx(s2 / 16, rel=1e-12)
    assert res.threshold == pytest.approx(0.16 * float(mean @ mean), rel=1e-12)
    assert res.passed == (s2 / 16 <= 0.16 * float(mean @ mean))
    assert nt.update(rows) == max(16, math.ceil(s2 / (0.16 * float(mean @ mean))))
    # micro-batch means of m samples: the per-sample variance is m times their sample variance
    res_m = S.AdaptiveBatchSize(64, eta=0.4).test(rows, samples_per_row=4)
    assert res_m.batch_size == 64 and res_m.variance == pytest.approx(4 * s2 / 64, rel=1e-12)


def test_noisy_quadratic_batch_growth_matches_closed_form():
    """f_i(x) = ||x - xi_i||^2 / 2 with xi_i ~ N(0, s^2 I_d); SGD x <- x - a g_B with the norm test.

    Per-sample gradients g_i = x - xi_i have trace variance sigma^2 = d s^2 and E||g_B||^2 = ||x||^2 + sigma^2/b.
    The test sets b' = sigma^2 / (eta^2 ||g_B||^2). Write q_k = sigma^2 / (b_k ||x_k||^2) (the relative noise)
    and u = E||x_{k+1}||^2 / ||x_k||^2 = (1 - a)^2 + a^2 q. Then q_{k+1} = eta^2 (1 + q_k) / u, whose fixed point
    solves a^2 q^2 + ((1 - a)^2 - eta^2) q - eta^2 = 0, and the batch grows by b_{k+1} / b_k = 1 / u per step
    (vs. the noiseless (1 - a)^-2).
    """
    a, eta, d, s = 0.2, 0.5, 500, 1.0
    c = (1 - a) ** 2 - eta ** 2
    q = (-c + math.sqrt(c * c + 4 * a * a * eta * eta)) / (2 * a * a)
    growth = 1.0 / ((1 - a) ** 2 + a * a * q)
    assert abs(growth / (1 - a) ** -2 - 1) > 0.03  # the noise term is visible at this tolerance
    rates = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        x = torch.full((d,), math.sqrt(s * s / (2 * eta ** 2)), dtype=torch.float64)  # b* = 2 at the start
        nt = S.AdaptiveBatchSize(2, eta=eta, max_batch_size=1_000_000)
        sizes = []
        for _ in range(20):
            b = nt.batch_size
            grads = x - s * torch.randn(b, d, generator=gen, dtype=torch.float64)
            expected = d * s * s / (eta ** 2 * (float(x @ x) + d * s * s / b))
            new = nt.update(grads)
            if b >= 50:
                assert abs(new / expected - 1) < 0.15
            x = x - a * grads.mean(0)
            sizes.append(new)
        sizes = np.array(sizes, dtype=np.float64)
        assert np.all(np.diff(sizes) >= 0)
        late = sizes >= 30
        rates.append(math.exp(np.polyfit(np.arange(20)[late], np.log(sizes[late]), 1)[0]))
    assert abs(np.mean(rates) / growth - 1) < 0.025, (rates, growth)


def test_per_sample_grads_match_a_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    loss_fn = torch.nn.functional.cross_entropy
    got = S.per_sample_grads(model, loss_fn, x, y)
    for i in range(6):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-6)
    nt = S.AdaptiveBatchSize(6, eta=0.3)
    assert nt.update(got) >= 6
    state = nt.state_dict()
    other = S.AdaptiveBatchSize(2, eta=0.9)
    other.load_state_dict(state)
    assert other.batch_size == nt.batch_size and other.eta == 0.3
