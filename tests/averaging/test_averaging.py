"""EMA, SWA and Switch-EMA against torch.optim.swa_utils (bit for bit) and their defining equations."""

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.optim.swa_utils import update_bn as torch_update_bn

from steepest.averaging import EMA, SWA, SwitchEMA, ema_decay, update_bn


def _model(bn=False, dtype=torch.float32):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.ReLU(), nn.Linear(8, 2)]
    return nn.Sequential(*layers).to(dtype)


def _train_steps(model, opt, n, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 4, generator=gen, dtype=dtype)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield x


def _assert_same(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_ema_matches_torch_averaged_model_bitwise(use_buffers, opt_cls):
    model = _model(bn=True)
    opt = opt_cls(model.parameters(), lr=0.05)
    ours = EMA(model, decay=0.9, use_buffers=use_buffers)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    for _ in _train_steps(model, opt, 25):
        ours.update_parameters(model)
        ref.update_parameters(model)
    _assert_same(ours, ref)
    assert int(ours.n_averaged) == 25


def test_ema_warmup_follows_the_formula():
    model = _model(dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.99, warmup=True)
    expect = None
    for t, _ in enumerate(_train_steps(model, opt, 40, dtype=torch.float64)):
        w = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        d = min(0.99, (1 + t) / (10 + t))
        expect = w if t == 0 else d * expect + (1 - d) * w
        ema.update_parameters(model)
    got = nn.utils.parameters_to_vector(ema.module.parameters())
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-14)
    assert ema_decay(0.99, 5, True) == pytest.approx(6 / 15) and ema_decay(0.99, 5000, True) == 0.99
    assert ema.current_decay() == pytest.approx(min(0.99, 41 / 50))


def test_swa_and_update_bn_match_torch_bitwise():
    model = _model(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ours, ref = SWA(model), AveragedModel(model)
    batches = []
    for x in _train_steps(model, opt, 30):
        ours.update_parameters(model)
        ref.update_parameters(model)
        batches.append((x, torch.zeros(16)))
    _assert_same(ours, ref)
    update_bn(batches, ours)
    torch_update_bn(batches, ref)
    _assert_same(ours, ref)
    bn = ours.module[1]
    assert bn.momentum == 0.1 and ours.training
    # the statistics are the plain average over the batches of the averaged model's activations
    with torch.no_grad():
        h = torch.stack([ours.module[0](x) for x, _ in batches])
    torch.testing.assert_close(bn.running_mean, h.mean(1).mean(0))


def test_swa_is_the_equal_weight_mean():
    model = _model(dtype=torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    swa = SWA(model)
    seen = []
    for _ in _train_steps(model, opt, 12, dtype=torch.float64):
        swa.update_parameters(model)
        seen.append(nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    torch.testing.assert_close(nn.utils.parameters_to_vector(swa.parameters()), torch.stack(seen).mean(0),
                               rtol=1e-12, atol=1e-14)


def test_state_dict_is_interchangeable_with_averaged_model():
    model = _model(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ours = EMA(model, decay=0.95)
    for _ in _train_steps(model, opt, 5):
        ours.update_parameters(model)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.95))
    ref.load_state_dict(ours.state_dict())
    back = EMA(model, decay=0.95)
    back.load_state_dict(ref.state_dict())
    _assert_same(back, ours)
    # continuing after the round trip gives the same average as never stopping
    twin = copy.deepcopy(model)
    for m in (ours, back):
        m.update_parameters(twin)
    _assert_same(back, ours)


def test_swapped_context_manager_restores_the_live_weights():
    model = _model(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.5)
    for _ in _train_steps(model, opt, 6):
        ema.update_parameters(model)
    live = copy.deepcopy(model.state_dict())
    x = torch.randn(5, 4)
    model.eval()
    ema.eval()
    with ema.swapped(model) as m:
        assert m is model
        torch.testing.assert_close(model(x), ema(x), rtol=0, atol=0)
    _assert_same(model, _with_state(live))
    with pytest.raises(RuntimeError):
        with ema.swapped(model):
            raise RuntimeError("boom")
    _assert_same(model, _with_state(live))


def _with_state(state):
    m = _model(bn=True)
    m.load_state_dict(state)
    return m


def test_switch_ema_copies_the_average_into_the_model_each_epoch():
    model = _model(dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sema = SwitchEMA(model, decay=0.8)
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref_ema = None
    for epoch in range(3):
        for _ in _train_steps(model, opt, 5, seed=epoch, dtype=torch.float64):
            sema.update_parameters(model)
        for _ in _train_steps(ref_model, ref_opt, 5, seed=epoch, dtype=torch.float64):  # the algorithm written out
            w = nn.utils.parameters_to_vector(ref_model.parameters()).detach().clone()
            ref_ema = w if ref_ema is None else 0.8 * ref_ema + 0.2 * w
        sema.switch(model)
        nn.utils.vector_to_parameters(ref_ema.clone(), ref_model.parameters())
        torch.testing.assert_close(nn.utils.parameters_to_vector(model.parameters()),
                                   nn.utils.parameters_to_vector(sema.module.parameters()), rtol=0, atol=0)
    torch.testing.assert_close(nn.utils.parameters_to_vector(model.parameters()), ref_ema, rtol=1e-12, atol=1e-14)


def test_ema_smooths_noisy_sgd_on_a_quadratic():
    torch.manual_seed(0)
    w = nn.Parameter(torch.zeros(20, dtype=torch.float64))
    holder = nn.Module()
    holder.w = w
    opt = torch.optim.SGD([w], lr=0.1)
    ema = EMA(holder, decay=0.98, warmup=True)
    for _ in range(600):
        w.grad = (w.detach() - 1.0) + 0.5 * torch.randn(20, dtype=torch.float64)  # noisy gradient of ||w-1||^2/2
        opt.step()
        ema.update_parameters(holder)
    err_live = float((w.detach() - 1).pow(2).mean())
    err_ema = float((ema.module.w.detach() - 1).pow(2).mean())
    assert err_ema < 0.3 * err_live


@pytest.mark.parametrize("call,err,name", [
    (lambda m: EMA(m, decay=1.5), ValueError, "decay"),
    (lambda m: EMA(m, decay=-0.1), ValueError, "decay"),
    (lambda m: SWA("model"), TypeError, "model"),
    (lambda m: EMA(m).update_parameters(nn.Linear(2, 2)), ValueError, "model"),
])
def test_bad_input(call, err, name):
    with pytest.raises(err, match=name):
        call(_model())


def test_swa_loop_with_any_optimizer():
    model = _model()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    swa = SWA(model)
    for _ in _train_steps(model, opt, 3):
        swa.update_parameters(model)
    assert int(swa.n_averaged) == 3 and torch.isfinite(nn.utils.parameters_to_vector(swa.parameters())).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_swa_and_ema_match_torch_on_cuda():
    model = _model(bn=True).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pairs = [(SWA(model), AveragedModel(model)),
             (EMA(model, decay=0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)))]
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        loss = model(torch.randn(16, 4, generator=gen).cuda()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for ours, ref in pairs:
            ours.update_parameters(model)
            ref.update_parameters(model)
    for ours, ref in pairs:
        _assert_same(ours, ref)


def test_packages_do_not_import_the_optimizers():
    import pathlib

    import steepest

    root = pathlib.Path(steepest.__file__).parent
    for sub in ("schedules", "averaging"):
        for f in (root / sub).rglob("*.py"):
            imports = [ln for ln in f.read_text().splitlines() if ln.lstrip().startswith(("import ", "from "))]
            bad = [ln for ln in imports if "steepest.optim" in ln or "..optim" in ln or ln.endswith(" import optim")]
            assert not bad, f
