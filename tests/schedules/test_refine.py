"""Schedule refinement (Defazio et al. 2023, arXiv 2310.07831) on the paper's closed-form cases."""

import numpy as np
import pytest
import torch

from steepest import schedules as S


@pytest.mark.parametrize("T", [2, 10, 1000])
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.5])
def test_constant_norms_give_linear_decay(T, tau):
    # w_t constant => eta_t = w * (T - 1 - t) w, normalised: (T - 1 - t) / (T - 1), the worst-case optimum
    sched = S.refine_schedule(np.full(T, 3.7), tau=tau)
    expect = (T - 1 - np.arange(T)) / (T - 1)
    np.testing.assert_allclose(sched.multipliers(), expect, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sched.multipliers(), S.LinearDecay(total=T - 1).multipliers(T), atol=1e-12)


@pytest.mark.parametrize("r", [0.99, 1.003])
@pytest.mark.parametrize("power", [2.0, 1.0])
def test_geometric_norms_closed_form(r, power):
    # ||g_t|| = r^(-t/power) => w_t = r^t and sum_{p>t} w_p = (r^(t+1) - r^T) / (1 - r)
    T = 400
    t = np.arange(T)
    g = r ** (-t / power)
    expect = r ** t * (r ** (t + 1) - r ** T) / (1 - r)
    expect /= expect.max()
    got = S.refine_schedule(g, tau=0.0, power=power).multipliers()
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-14)


def test_oracle_transcription_with_scipy_median_filter():
    from scipy.ndimage import median_filter

    rng = np.random.default_rng(0)
    T = 2000
    g = np.exp(-np.linspace(0, 3, T)) + 0.2 + 0.05 * rng.standard_normal(T) ** 2
    tau = 0.1
    width = 2 * (int(tau * T) // 2) + 1
    pad = 2 * width
    smooth = median_filter(np.pad(g, (0, pad), mode="reflect"), size=width, mode="nearest")[:-pad]
    np.testing.assert_array_equal(S.median_smooth(g, width), smooth)
    w = smooth ** -2.0
    eta = np.array([w[i] * w[i + 1:].sum() for i in range(T)])
    eta /= eta.max()
    np.testing.assert_allclose(S.refine_schedule(g, tau=tau).multipliers(), eta, rtol=1e-10, atol=1e-14)


def test_falling_then_rising_norms_give_warmup_and_fast_cooldown():
    T = 1000
    t = np.arange(T) / T
    g = 1.0 + 4.0 * np.exp(-t / 0.05) + 2.0 * np.clip(t - 0.8, 0, None) / 0.2  # high early, rising late
    eta = S.refine_schedule(g, tau=0.02).multipliers()
    peak = int(np.argmax(eta))
    assert 20 < peak < 400 and eta[0] < 0.2  # a warmup emerges from the data
    lin = S.LinearDecay(total=T - 1).multipliers(T)
    assert eta[900] < 0.7 * lin[900] * eta[peak] / lin[peak]  # the end anneals faster than linear


def test_resample_and_use_in_a_scheduler():
    g = np.linspace(2.0, 1.0, 50)
    sched = S.refine_schedule(g, total=200)
    assert sched.total == 200 and max(sched.values) == 1.0 and sched.values[-1] == 0.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.3)
    lr_sched = S.refined(opt, g, total=200)
    assert lr_sched.get_last_lr()[0] == pytest.approx(0.3 * sched(0))


@pytest.mark.parametrize("bad,name", [([1.0], "grad_norms"), ([1.0, 0.0, 1.0], "grad_norms"),
                                      ([1.0, float("nan")], "grad_norms"), (np.ones(5), "tau"),
                                      (np.ones(5), "power")])
def test_bad_input(bad, name):
    kwargs = {"tau": 2.0} if name == "tau" else {"power": -1.0} if name == "power" else {}
    with pytest.raises(ValueError, match=name):
        S.refine_schedule(bad, **kwargs)
