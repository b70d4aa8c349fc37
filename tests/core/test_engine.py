"""The engine's own behaviour: precision, fallbacks, GradScaler, registry and checks."""

from __future__ import annotations

import warnings

import pytest
import torch

import steepest
from steepest.core import checks, registry
from steepest.core.base import _COMPILE_MIN_NUMEL, compiled_graphs
from steepest.core.global_step import GlobalStepOptimizer
from steepest.core.precision import stochastic_round_to_bf16

from ..fused_calls import recording_fused_calls


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    torch.manual_seed(0)
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    ulp = 2.0**-7  # bfloat16 spacing in [1, 2)
    x = torch.full((200_000,), 1.0 + 0.3 * ulp)
    r = stochastic_round_to_bf16(x).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + ulp}
    frac_up = (r > lo.float()).float().mean().item()
    # Binomial(200k, 0.3): standard deviation ~0.001.
    assert abs(frac_up - 0.3) < 0.005
    assert abs(r.double().mean().item() - x.double().mean().item()) < 5e-3 * ulp


def test_stochastic_rounding_keeps_nan_inf_and_exact_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5, 0.0, -2.0, 3.3895313892515355e38])
    r = stochastic_round_to_bf16(x)
    assert torch.isnan(r[0]) and r[1] == float("inf") and r[2] == -float("inf")
    assert r[3:6].tolist() == [1.5, 0.0, -2.0]
    assert torch.isfinite(r[6])


def _compiled_rounding():
    return torch.compile(lambda x: stochastic_round_to_bf16(x * 1.0), dynamic=True, fullgraph=True)


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_stochastic_rounding_noise_is_fresh_per_call_for_every_element(path):
    """Each element rounds up with probability its discarded fraction at every call, independently of earlier
    calls: over 200 calls the per-element frequencies spread as Binomial(200, p) / 200 (noise fixed across calls
    would give frequencies of 0 and 1). More elements than one noise segment (eager: 2**18) and uneven fractions."""
    torch.manual_seed(0)
    ulp = 2.0**-7
    n = (1 << 18) + 5000
    frac = torch.linspace(0.05, 0.95, n)
    x = 1.0 + frac * ulp
    sr = stochastic_round_to_bf16 if path == "eager" else _compiled_rounding()
    ups = torch.zeros(n)
    calls = 200
    for _ in range(calls):
        r = sr(x).float()
        assert bool(((r == 1.0) | (r == 1.0 + ulp)).all())
        ups += (r > 1.0).float()
    freq = ups / calls
    # Mean over elements: within 3 standard errors of the exact mean of the fractions.
    assert abs(freq.mean().item() - frac.mean().item()) < 3 * (0.25 / (calls * n)) ** 0.5
    # Per element: the spread of freq - frac is the binomial one, sqrt(p (1 - p) / 200) averaged (~0.029).
    spread = (freq - frac).std().item()
    expected = (frac * (1 - frac) / calls).sqrt().pow(2).mean().sqrt().item()
    assert 0.9 * expected < spread < 1.1 * expected
    # The first and second segment of the eager noise are not copies of each other.
    assert not torch.equal(sr(x)[: 5000], sr(x)[1 << 18:])


def test_compiled_stochastic_rounding_keeps_nan_inf_and_exact_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5, 0.0, -2.0, 3.3895313892515355e38,
                      -3.3895e38, 1e-40])
    r = _compiled_rounding()(x)
    assert torch.isnan(r[0]) and r[1] == float("inf") and r[2] == -float("inf")
    assert r[3:6].tolist() == [1.5, 0.0, -2.0]
    assert bool(torch.isfinite(r[6:8]).all())
    eager = stochastic_round_to_bf16(torch.tensor([3.3895313892515355e38, -3.3895e38, float("inf"),
                                                   float("nan")] + [1.0] * 10))
    assert bool(torch.isfinite(eager[:2]).all()) and eager[2] == float("inf") and torch.isnan(eager[3])


def test_eager_bf16_params_larger_than_a_chunk_follow_the_float32_run_rounded():
    """A bfloat16 param of 600k elements steps eager in flat pieces; its run equals torch.optim.AdamW on float32
    copies whose params are rounded to bfloat16 after every step (the states stay float32), to one bf16 ulp."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(600, 1000, generator=g)
    p16 = torch.nn.Parameter(w.bfloat16())
    ref = torch.nn.Parameter(w.bfloat16().float())
    ours = steepest.AdamW([p16], lr=1e-2, weight_decay=0.1, compile=False)
    theirs = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=False)
    for t in range(5):
        grad = torch.sin(w * (t + 1)).bfloat16()
        p16.grad, ref.grad = grad, grad.float()
        ours.step()
        theirs.step()
        with torch.no_grad():
            ref.copy_(ref.bfloat16().float())
    assert ours.state[p16]["exp_avg"].dtype == torch.float32
    same = (p16.float() == ref.detach()).float().mean().item()
    assert same > 0.999
    torch.testing.assert_close(p16.float(), ref.detach(), rtol=2**-7, atol=1e-6)


def test_bf16_params_get_float32_states_and_track_float32_run():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    p16 = torch.nn.Parameter(w.bfloat16())
    p32 = torch.nn.Parameter(w.clone())
    o16 = steepest.AdamW([p16], lr=1e-2)
    o32 = steepest.AdamW([p32], lr=1e-2)
    for t in range(10):
        g = torch.sin(w * (t + 1))
        p16.grad, p32.grad = g.bfloat16(), g.clone()
        o16.step()
        o32.step()
    assert o16.state[p16]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(p16.float(), p32.detach(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("compile", [False, True])
def test_stochastic_rounding_keeps_small_updates_of_bf16_params(compile):
    # Updates far below half a bf16 ulp vanish under round-to-nearest but survive on average with SR; in the
    # compiled kernel too, which must draw fresh noise at every step.
    torch.manual_seed(0)
    n, steps, lr = 4096, 50, 1e-4
    p_rn = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    p_sr = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    o_rn = steepest.SGD([p_rn], lr=lr, compile=compile)
    o_sr = steepest.SGD([p_sr], lr=lr, stochastic_rounding=True, compile=compile)
    with recording_fused_calls() as calls:
        for _ in range(steps):
            p_rn.grad = -torch.ones(n, dtype=torch.bfloat16)
            p_sr.grad = -torch.ones(n, dtype=torch.bfloat16)
            o_rn.step()
            o_sr.step()
    if compile:  # every step of the stochastic-rounding run went through its kernel
        calls.assert_all_fused(opt=o_sr, calls=steps)
    assert torch.all(p_rn == 1.0)
    expected = 1.0 + steps * lr
    assert abs(p_sr.double().mean().item() - expected) < 0.1 * steps * lr
    # The mean also holds with the same noise at every step (a fixed 1.3% of the elements, those whose noise
    # exceeds 1 - lr/ulp, round up at every step; the rest never move): the spread over elements tells them
    # apart. Fresh noise rounds each element up Binomial(50, lr/ulp = 0.0128) times: 47.5% of them move, by at
    # most a few ulps. Measured (seed 0, eager and compiled): fresh noise, 47.5-47.9% moved, at most 5 ulps;
    # noise fixed across steps, 1.3% moved, by 50 ulps each.
    ulps = ((p_sr.detach().double() - 1.0) / 2.0**-7).round()  # bf16 spacing in [1, 2)
    assert (ulps > 0).double().mean().item() > 0.3
    assert ulps.max().item() <= 12


@pytest.mark.parametrize("compile", [True, "background"])
def test_compile_failure_falls_back_to_eager_in_either_mode(monkeypatch, compile):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(torch._inductor, "standalone_compile", broken)
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.float64))
    q = torch.nn.Parameter(torch.ones(8, dtype=torch.float64))
    opt = steepest.AdamW([p], lr=0.1, compile=compile)
    ref = steepest.AdamW([q], lr=0.1, compile=False)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        for _ in range(3):
            p.grad = torch.arange(8.0, dtype=torch.float64)
            q.grad = p.grad.clone()
            opt.step()
            ref.step()
            opt.wait_compiled(60)
    assert torch.equal(p, q) and not opt._compile_jobs


def _offset_params(shapes, dtype=torch.float64):
    """Parameters that are views into one flat buffer (as with flattened-parameter wrappers): most have a
    non-zero storage offset."""
    flat = torch.linspace(-1, 1, sum(torch.Size(s).numel() for s in shapes), dtype=dtype)
    params, offset = [], 0
    for s in shapes:
        n = torch.Size(s).numel()
        params.append(torch.nn.Parameter(flat[offset:offset + n].view(s)))
        offset += n
    return params


SHAPES_10 = [(30, 20), (17,), (5, 4, 2), (100,), (4, 4), (13,), (6,), (5, 3), (7,), (16, 16)]


def _train(params, opt, steps, start=0):
    for t in range(start, start + steps):
        for p in params:
            p.grad = torch.cos(p.detach() * (t + 2))
        opt.step()


def test_background_compile_steps_eager_until_ready_then_fused():
    ref = _offset_params(SHAPES_10)
    ref_opt = steepest.AdamW(ref, lr=0.05, weight_decay=0.1, compile=False)
    _train(ref, ref_opt, 1)
    graphs = compiled_graphs()
    params = _offset_params(SHAPES_10)
    opt = steepest.AdamW(params, lr=0.05, weight_decay=0.1, compile="background")
    with recording_fused_calls() as calls:
        _train(params, opt, 1)
        # The first step ran eager while the kernel compiles on stand-ins: bit for bit the eager step.
        assert all(torch.equal(a, b) for a, b in zip(params, ref))
        assert [c.done for c in calls.since(0, opt)] == [[]]
        assert opt.wait_compiled(120) and opt._compile_jobs
        ready = calls.mark()
        _train(params, opt, 4, start=1)
        # Once ready, each of the 4 steps ran the kernel over all 10 tensors.
        calls.assert_all_fused(ready, opt, calls=4)
        assert all(len(c.done) == 10 for c in calls.since(ready, opt))
    _train(ref, ref_opt, 4, start=1)
    assert not opt._compile_jobs and len(opt._kernels) == 1
    assert compiled_graphs() == graphs + 1, "every shape and storage offset share one graph"
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, kernels", [("prodigy", 2), ("dadapt_adam", 1), ("dog", 2)])
def test_global_step_passes_compile_in_the_background_then_run_fused(name, kernels):
    """A global-step method's passes: the first step runs eager while they compile on stand-ins (bit for bit the
    eager step); once ready, each pass is one kernel for every shape and storage offset, its reductions returned,
    and the trajectory stays the eager one."""
    cls = steepest.get(name).cls
    ref = _offset_params(SHAPES_10)
    ref_opt = cls(ref, compile=False)
    _train(ref, ref_opt, 1)
    graphs = compiled_graphs()
    params = _offset_params(SHAPES_10)
    opt = cls(params, compile="background")
    with recording_fused_calls() as calls:
        _train(params, opt, 1)
        assert all(torch.equal(a, b) for a, b in zip(params, ref))
        assert opt.wait_compiled(120)
        ready = calls.mark()
        _train(params, opt, 4, start=1)
    # Once ready, every pass of the 4 steps ran its kernel over all 10 tensors.
    assert len(calls.assert_all_fused(ready, opt)) >= 4
    assert all(len(c.done) == 10 for c in calls.since(ready, opt))
    _train(ref, ref_opt, 4, start=1)
    assert not opt._compile_jobs and len(opt._kernels) == kernels == compiled_graphs() - graphs
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["dadapt_adam", "prodigy", "dog"])
def test_global_step_passes_mix_fused_and_eager_tensors(name):
    """One-element params and params with gaps in their memory (a strided slice) take the eager pass beside the
    fused ones; the reductions of both add up to the eager step's."""
    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(40, 30, dtype=torch.float64)),
                torch.nn.Parameter(torch.randn(1, dtype=torch.float64)),
                torch.nn.Parameter(torch.randn(20, 60, dtype=torch.float64)[:, ::2]),
                torch.nn.Parameter(torch.randn(77, dtype=torch.float64))]
    ref, params = make(), make()
    assert not params[2].is_contiguous()
    fused = _fused_follows_eager(steepest.get(name).cls, ref, params)
    # The kernels took the two fusable tensors at every pass; the other two went eager.
    assert all(c.given == 4 and sorted(c.done) == [0, 3] for c in fused)


def _fused_follows_eager(cls, ref, params, steps=4):
    """cls stepped eager on ref and compiled on params (equal copies): every kernel compiled and run at every
    step (every pass's planned tensors done by a kernel), same trajectory. Returns the fused-path calls."""
    _train(ref, cls(ref, compile=False), steps)
    opt = cls(params, compile=True)
    with recording_fused_calls() as calls:
        _train(params, opt, steps)
    assert opt._kernels and all(k is not None for k in opt._kernels.values())
    fused = calls.assert_all_fused(opt=opt)
    assert len(fused) >= steps
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    return fused


def test_global_step_pass_outputs_through_torch_compile(monkeypatch):
    """Where torch lacks inductor's standalone compiler, the passes go through torch.compile and their kernels
    still return the reductions: D-Adapt Adam and DoG follow their eager trajectories."""
    monkeypatch.delattr(torch._inductor, "standalone_compile", raising=False)
    for name in ("dadapt_adam", "dog"):
        _fused_follows_eager(steepest.get(name).cls, _offset_params(SHAPES_10), _offset_params(SHAPES_10))


@pytest.mark.parametrize("standalone", [True, False])
def test_fused_params_with_storage_offsets_share_one_graph(monkeypatch, standalone):
    """Views into one buffer at odd offsets, through inductor's standalone compiler or (where torch lacks it)
    torch.compile: one graph, and the eager path's numbers."""
    if not standalone:
        monkeypatch.delattr(torch._inductor, "standalone_compile", raising=False)
    ref = _offset_params(SHAPES_10)
    _train(ref, steepest.AdamW(ref, lr=0.05, weight_decay=0.1, compile=False), 3)
    params = _offset_params(SHAPES_10)
    opt = steepest.AdamW(params, lr=0.05, weight_decay=0.1, compile=True)
    graphs = compiled_graphs()
    with recording_fused_calls() as calls:
        _train(params, opt, 3)
    assert compiled_graphs() == graphs + 1
    # The one graph ran each step over all 10 tensors.
    assert all(len(c.done) == 10 for c in calls.assert_all_fused(opt=opt, calls=3))
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_background_compile_survives_deepcopy_while_pending():
    import copy

    params = _offset_params(SHAPES_10)
    opt = steepest.AdamW(params, lr=0.05, compile="background")
    _train(params, opt, 1)
    params2, opt2 = copy.deepcopy((params, opt))
    assert opt2.compile == "background" and not opt2._compile_jobs
    for t in (1, 2):
        _train(params2, opt2, 1, start=t)
        opt2.wait_compiled(120)
        _train(params, opt, 1, start=t)
    for a, b in zip(params, params2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_auto_compile_threshold():
    small = steepest.AdamW([torch.nn.Parameter(torch.ones(10))])
    assert not small._wants_compile([torch.ones(10)])
    assert small._wants_compile([torch.ones(_COMPILE_MIN_NUMEL)])
    assert not steepest.AdamW([torch.nn.Parameter(torch.ones(1))], compile=False)._wants_compile(
        [torch.ones(_COMPILE_MIN_NUMEL)])


def test_auto_compile_decides_on_the_whole_step_not_each_group():
    """Layer-wise learning rates put every tensor in a group of its own: "auto" fuses when the step's params hold
    2**20 elements in all, though no group does, and the fused steps equal eager ones."""
    def run(compile):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(_COMPILE_MIN_NUMEL // 4, generator=g)) for _ in range(4)]
        opt = steepest.AdamW([{"params": [p], "lr": 0.01 * 0.5**i} for i, p in enumerate(params)],
                             compile=compile)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return opt, params

    auto, fused = run("auto")
    assert auto._kernels and all(k is not None for k in auto._kernels.values())
    eager, expected = run(False)
    assert not eager._kernels
    for a, b in zip(fused, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    small = steepest.AdamW([{"params": [torch.nn.Parameter(torch.ones(10))]} for _ in range(3)])
    for group in small.param_groups:
        group["params"][0].grad = torch.ones(10)
    small.step()
    assert not small._kernels


# Elementwise updates run flattened in chunks of tensors; updates with whole-tensor reductions (TAM's cosine,
# NovoGrad's norm, Gravity's max) flattened one tensor per call, with one-number-per-tensor states. Either
# way one compiled graph serves every shape.
@pytest.mark.parametrize("name,kwargs", [("adamw", {"lr": 0.05, "weight_decay": 0.1}),
                                         ("adatamw", {"lr": 0.05, "weight_decay": 0.1}),
                                         ("novograd", {"lr": 0.05, "weight_decay": 0.1}),
                                         ("gravity", {"lr": 0.05, "alpha": 0.0})])
def test_fused_chunks_with_uneven_sizes_match_eager(name, kwargs):
    shapes = [(3, 5), (17,), (2, 2, 2), (9,), (4, 4), (11,), (6,), (5, 3), (7,), (13,)]  # full and padded chunks
    assert steepest.get(name).cls._flattenable()
    def run(compile):
        ps = [torch.nn.Parameter(torch.linspace(-1, 1, torch.Size(s).numel(), dtype=torch.float64).reshape(s))
              for s in shapes]
        opt = steepest.get(name).cls(ps, **kwargs, compile=compile)
        for t in range(4):
            for p in ps:
                p.grad = torch.cos(p.detach() * (t + 2))
            opt.step()
        return ps
    graphs = compiled_graphs()
    with recording_fused_calls() as calls:
        fused = run(True)
    assert compiled_graphs() == graphs + 1, "tensors of every shape share one compiled graph"
    # The kernel ran each of the 4 steps over all 10 tensors (full and padded chunks alike).
    assert all(len(c.done) == len(shapes) for c in calls.assert_all_fused(calls=4))
    for a, b in zip(fused, run(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fused_path_follows_replaced_param_and_state_memory():
    """The compiled path reuses flat aliases of params and states between steps; replacing a param's data,
    loading a state_dict (new state tensors) or fresh gradients each step must still update the live
    tensors, exactly as the eager path does."""
    torch.manual_seed(0)
    shapes = [(6, 5), (17,), (4, 4), (9,)]

    def run(compile):
        ps = [torch.nn.Parameter(torch.linspace(-1, 1, torch.Size(s).numel(), dtype=torch.float64).reshape(s))
              for s in shapes]
        opt = steepest.AdamW(ps, lr=0.05, weight_decay=0.1, compile=compile)

        def step(t):
            for p in ps:
                p.grad = torch.cos(p.detach() * (t + 2))  # a new gradient tensor every step
            opt.step()

        step(0)
        step(1)
        ps[0].data = ps[0].detach() * 0.5 + 0.1  # new memory for a param
        step(2)
        sd = opt.state_dict()
        opt.load_state_dict({"state": {k: {n: (v * 1.5 if torch.is_tensor(v) and v.dim() else v)
                                            for n, v in st.items()} for k, st in sd["state"].items()},
                             "param_groups": sd["param_groups"]})  # new state tensors
        step(3)
        step(4)
        return [p.detach().clone() for p in ps], opt.state_dict()

    fused, fused_sd = run(True)
    eager, eager_sd = run(False)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for k in eager_sd["state"]:
        for n in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused_sd["state"][k][n], eager_sd["state"][k][n], rtol=1e-12, atol=1e-14)


def test_grad_scaler_skips_inf_steps_and_unscales():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = steepest.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    ref = torch.nn.Linear(4, 1)
    ref.load_state_dict(model.state_dict())
    ref_opt = steepest.AdamW(ref.parameters(), lr=0.1)
    for step in range(3):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step == 1:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        if step != 1:
            ref_opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            ref_opt.step()
    assert scaler.get_scale() == 512.0
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_checks_name_the_parameter_and_range():
    with pytest.raises(ValueError, match=r"lr must lie in \[0, inf\), got -1"):
        checks.nonnegative("lr", -1)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        checks.betas(2)("betas", (0.9, 1.0))
    with pytest.raises(TypeError, match="eps must be a real number"):
        checks.positive("eps", "1e-8")
    with pytest.raises(ValueError, match="one-element tensor"):
        checks.nonnegative("lr", torch.ones(2))
    checks.nonnegative("lr", torch.tensor(0.1))


def test_registry_suggests_close_names():
    with pytest.raises(KeyError, match="did you mean adamw"):
        registry.get("adamww")
    assert registry.get("AdamW").cls is steepest.AdamW


def test_unknown_constructor_option_is_a_type_error():
    with pytest.raises(TypeError):
        steepest.AdamW([torch.nn.Parameter(torch.ones(2))], learning_rate=0.1)
    with pytest.raises(ValueError, match="compile"):
        steepest.AdamW([torch.nn.Parameter(torch.ones(2))], compile="sometimes")


def test_loading_torch_adamw_state_dict_continues_identically():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    ta = torch.optim.AdamW([a], lr=0.01, weight_decay=0.1)
    for t in range(3):
        a.grad = torch.sin(a.detach() * (t + 1))
        ta.step()
    b.data.copy_(a.detach())
    ours = steepest.AdamW([b], lr=0.01, weight_decay=0.1)
    ours.load_state_dict(ta.state_dict())
    assert ours.state[b]["step"] == 3
    for t in range(3, 6):
        a.grad = torch.sin(a.detach() * (t + 1))
        b.grad = a.grad.clone()
        ta.step()
        ours.step()
    assert torch.equal(a, b)


def test_shaped_gradient_probe_tells_kernels_that_read_grad_sizes():
    """Flat kernels take gradients in their own shape only if they read each slot's size from the param."""
    from steepest.core.base import _reads_sizes_from_params

    example = [torch.zeros(10), torch.zeros(12), torch.zeros(10), torch.zeros(12),
               torch.tensor(0.5, dtype=torch.float64)]

    def sizes_from_params(*a):
        for p, g in zip(a[:2], a[2:4]):
            p.sub_(g.reshape(-1)[:p.numel()] * a[4])

    def sizes_from_grads(*a):
        for p, g in zip(a[:2], a[2:4]):
            n = g.shape[0]
            p[:n].sub_(g.reshape(-1)[:n] * a[4])

    assert _reads_sizes_from_params(sizes_from_params, example, 2)
    assert not _reads_sizes_from_params(sizes_from_grads, example, 2)
    ps = [torch.nn.Parameter(torch.ones(4, 5)), torch.nn.Parameter(torch.ones(3))]
    for p in ps:
        p.grad = torch.ones_like(p)
    opt = steepest.AdamW(ps, compile=True)
    opt.step()
    assert [k.shaped_grads for k in opt._kernels.values()] == [True]


@pytest.mark.parametrize("update", ["branch", "constant"])
def test_flat_kernel_refuses_updates_that_depend_on_sizes(update):
    """The flat kernel checks no guards at call time, so an update whose trace depends on a size (a branch, or a
    size turned into a number) must not be compiled: the optimizer warns and steps eager, with the eager numbers."""
    import math

    def by_size(params, grads, *, lr):
        for p, g in zip(params, grads):
            if update == "branch":
                p.add_(g * (-lr if p.shape[0] > 300_000 else lr))
            else:
                p.add_(g * (-lr / math.sqrt(p.shape[0])))

    class SizeDependent(steepest.Optimizer):
        hyperparams = {"lr": checks.nonnegative}
        update = staticmethod(by_size)

        def __init__(self, params, lr, compile):
            super().__init__(params, dict(lr=lr), compile=compile)

    def run(compile):
        params = [torch.nn.Parameter(torch.ones(7)), torch.nn.Parameter(torch.ones(3, 3))]
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        SizeDependent(params, lr=0.1, compile=compile).step()
        return params

    with pytest.warns(RuntimeWarning, match="cannot serve every shape"):
        fused = run(True)
    for a, b in zip(fused, run(False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_matrix_view_kernels_match_eager_for_every_shape(name):
    """AdamP/SGDP project per output channel: params of 2+ dims run as (shape[0], rest) matrices, one compiled
    graph for every such shape (rows or columns of 1 included), the others flat; gradients orthogonal to their
    param make the projections happen."""
    shapes = [(3, 5), (17,), (2, 2, 2), (9,), (4, 4), (1, 11), (6, 1), (5, 3, 2, 2), (7,), (13,)]

    def run(compile, delta=0.1):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
        opt = steepest.get(name).cls(ps, lr=0.05, weight_decay=0.1, delta=delta, compile=compile)
        for t in range(5):
            for i, p in enumerate(ps):
                g = torch.cos(p.detach() * (t + 2))
                if i % 2 == 0:  # orthogonal to p: |cos| = 0 < delta / sqrt(fan-in), so the update is projected
                    g = g - p.detach() * (g * p.detach()).sum() / (p.detach() ** 2).sum()
                p.grad = g
            opt.step()
        return ps, opt

    graphs = compiled_graphs()
    fused, opt = run(True)
    assert compiled_graphs() == graphs + 2 and sorted(k[-2] for k in opt._kernels) == ["flat", "matrix"]
    eager, _ = run(False)
    unprojected, _ = run(False, delta=0.0)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(a, b) for a, b in zip(eager, unprojected) if a.dim() > 1)


def test_background_compiles_take_turns(monkeypatch):
    """Tracing keeps process-wide state in torch, so kernels compiling in background threads (here SGDP's flat and
    matrix layouts) must not overlap; both still compile and the steps match eager."""
    import threading
    import time

    from steepest.core import base

    running, overlap, real = [0], [0], base._compile_flat
    guard = threading.Lock()

    def watched(*args, **kwargs):
        with guard:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
        time.sleep(0.2)
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                running[0] -= 1

    monkeypatch.setattr(base, "_compile_flat", watched)

    def run(compile):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(6, 5), (17,), (3, 2, 2)]]
        opt = steepest.SGDP(ps, lr=0.01, momentum=0.9, weight_decay=0.1, compile=compile)
        for t in range(3):
            for p in ps:
                p.grad = torch.cos(p.detach() * (t + 2))
            opt.step()
            opt.wait_compiled(120)
        return ps, opt

    fused, opt = run("background")
    assert overlap[0] == 1 and sorted(k[-2] for k, v in opt._kernels.items() if v is not None) == ["flat", "matrix"]
    for a, b in zip(fused, run(False)[0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "fused"])
def test_compiled_training_step_compiles_once_and_equals_the_uncompiled_one(compile):
    """A training step under torch.compile (forward, backward, step, zero_grad) with a learning-rate schedule:
    the caller's graphs are traced at the first steps only (the step itself is a graph break, so its count and
    learning rate are no constants of them), and the params follow the uncompiled run."""
    from torch._dynamo.utils import counters

    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
        x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
        opt = steepest.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, compile=compile)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)

        def train_step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        step = torch.compile(train_step) if compiled else train_step
        graphs = []
        for _ in range(8):
            step()
            sched.step()
            graphs.append(counters["stats"]["unique_graphs"])
        return list(model.parameters()), graphs

    torch._dynamo.reset()
    counters["stats"].clear()
    compiled, graphs = run(True)
    assert graphs[1] == graphs[-1], f"graphs traced at each step: {graphs}"
    for a, b in zip(compiled, run(False)[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_realized_values_are_kernel_outputs_and_leave_the_numbers_alone(monkeypatch):
    """mt.realize marks a small value that inductor must store once instead of inlining its formula into the
    param-sized loop: the traced graph returns exactly the realized values, and the fused step equals eager.
    Eager it hands back its argument (numbers included)."""
    from steepest.core import multitensor as mt

    x = torch.ones(3)
    assert mt.realize(x) is x and mt.realize(0.5) == 0.5

    def scaled_step(params, grads, *, lr):
        for p, g in zip(params, grads):
            scale = mt.realize(lr / (g.square().sum().sqrt() + 1.0))  # a per-tensor number: one value per call
            p.sub_(g * scale)

    class NormScaled(steepest.Optimizer):
        hyperparams = {"lr": checks.nonnegative}
        whole_tensor_reductions = True
        elementwise = False
        update = staticmethod(scaled_step)

        def __init__(self, params, lr, compile):
            super().__init__(params, dict(lr=lr), compile=compile)

    graphs = []
    standalone = torch._inductor.standalone_compile

    def capture(graph, *args, **kwargs):
        graphs.append(graph)
        return standalone(graph, *args, **kwargs)

    monkeypatch.setattr(torch._inductor, "standalone_compile", capture)

    def run(compile):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, n, dtype=torch.float64)) for n in (7, 12)]
        opt = NormScaled(params, lr=0.3, compile=compile)
        for t in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * (t + 2))
            opt.step()
        return params

    fused = run(True)
    (output,) = [n for n in graphs[0].graph.nodes if n.op == "output"]
    returned = output.args[0]
    assert len(returned) == 1 and returned[0].meta["val"].shape == ()
    for a, b in zip(fused, run(False)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def _cpu_isa_modules():
    from torch._inductor import config, cpp_builder, cpu_vec_isa

    if not cpu_vec_isa.x86_isa_checker():
        pytest.skip("no x86 vector ISA on this machine")
    return config, cpp_builder, cpu_vec_isa


def test_cpu_isa_list_is_settled_from_the_cpus_report_without_builds(monkeypatch, tmp_path):
    """The engine settles inductor's valid-ISA list from the CPU's report, building nothing even with an empty
    inductor cache (a fresh machine), and the list and each ISA's BF16 flag equal what inductor's own probe (a
    test library built and loaded per ISA and sub-feature, fresh ISA objects) gives here."""
    from steepest.core import base

    config, cpp_builder, cpu_vec_isa = _cpu_isa_modules()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    builds = []
    build = cpp_builder.CppBuilder.build
    monkeypatch.setattr(cpp_builder.CppBuilder, "build", lambda self: (builds.append(self), build(self))[1])
    monkeypatch.setattr(base, "_cpu_isa_settled", None)
    base._forget_isa_checks(cpu_vec_isa)
    try:
        def answers():
            return [(str(isa), getattr(isa, "_is_avx512_bf16_supported", None))
                    for isa in cpu_vec_isa.valid_vec_isa_list()]

        base._settle_cpu_isa()
        settled = answers()
        assert builds == [] and settled and base._cpu_isa_settled is True
        # Inductor's own probe, its cached answers forgotten first (an ISA object equal to a settled one would
        # otherwise be answered from the settled cache).
        base._forget_isa_checks(cpu_vec_isa)
        probed = answers()
        assert builds  # the probe did build: the empty cache was in use
        assert settled == probed
    finally:
        monkeypatch.undo()
        base._forget_isa_checks(cpu_vec_isa)
        base._cpu_isa_settled = None
        base._settle_cpu_isa()


@pytest.mark.parametrize("how", ["option", "env"])
def test_cpu_isa_list_is_left_to_inductor_when_the_user_chose(monkeypatch, how):
    """TORCHINDUCTOR_VEC_ISA_OK (inductor's option) or ATEN_CPU_CAPABILITY set by the user: the engine settles
    nothing."""
    from steepest.core import base

    config, _, cpu_vec_isa = _cpu_isa_modules()
    if how == "env":
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setattr(base, "_cpu_isa_settled", None)
    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    try:
        # config.patch, not monkeypatch: undoing a monkeypatch of an inductor option deletes the option.
        with config.patch({"cpp.vec_isa_ok": False} if how == "option" else {}):
            base._settle_cpu_isa()
        assert cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 0 and base._cpu_isa_settled is False
    finally:
        monkeypatch.undo()
        base._cpu_isa_settled = None
        base._settle_cpu_isa()


def test_kernel_that_fails_to_compile_for_the_settled_isa_is_compiled_again_after_inductors_probe(monkeypatch):
    """A compile that fails while the ISA list is the one settled from the CPU's report hands the list back to
    inductor's probe and compiles once more: the step runs fused, with the eager path's numbers."""
    from steepest.core import base

    _, _, cpu_vec_isa = _cpu_isa_modules()
    monkeypatch.setattr(base, "_cpu_isa_settled", None)
    base._forget_isa_checks(cpu_vec_isa)
    checks = []
    check_build = cpu_vec_isa.VecISA.check_build
    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", lambda self, code: (checks.append(self),
                                                                               check_build(self, code))[1])
    compile_ = torch._inductor.standalone_compile
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(cpu_vec_isa.valid_vec_isa_list.cache_info().currsize)
        if len(calls) == 1:
            raise RuntimeError("g++: error: unrecognized command-line option")
        return compile_(*args, **kwargs)

    monkeypatch.setattr(torch._inductor, "standalone_compile", failing_once)
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(64, 33)) for _ in range(2)]
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    _train(ref, steepest.AdamW(ref, lr=0.05, compile=False), 2)
    opt = steepest.AdamW(params, lr=0.05, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(params, opt, 2)
    assert not [str(w.message) for w in caught if "eager path" in str(w.message)]  # the second compile succeeded
    assert len(calls) == 2 and base._cpu_isa_settled is False
    # Inductor's probe asked again about every ISA it keeps: the answers the settled list had cached were forgotten.
    assert {type(isa) for isa in cpu_vec_isa.valid_vec_isa_list()} <= {type(isa) for isa in checks}
    assert opt._kernels and all(k is not None for k in opt._kernels.values())
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_norms_and_squared_norms_match_float64_and_keep_nonfinite_values():
    """mt.norms / mt.squared_norms (eager: dot products on the CPU, the for-each norm elsewhere) against float64,
    for a large tensor, a non-contiguous one, empty and zero tensors, and Inf/NaN entries."""
    from steepest.core import multitensor as mt

    torch.manual_seed(0)
    floats = [torch.randn(1 << 20) * 3 + 1, torch.randn(7, 5).t(), torch.zeros(0), torch.zeros(3),
              torch.tensor([float("inf"), 1.0]), torch.tensor([float("nan"), 1.0]), torch.randn(9, dtype=torch.float64)]
    for xs, rtol in ((floats, 1.5e-5), ([torch.randn(6).bfloat16(), torch.randn(5)], 1e-2)):
        for x, n, s in zip(xs, mt.norms(xs), mt.squared_norms(xs)):
            ref = x.double().square().sum()
            assert n.dtype == x.dtype and s.dtype == x.dtype and n.dim() == 0 and s.dim() == 0
            torch.testing.assert_close(s.double(), ref, rtol=rtol, atol=0, equal_nan=True)
            torch.testing.assert_close(n.double(), ref.sqrt(), rtol=rtol, atol=0, equal_nan=True)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_child_forked_during_a_compile_starts_without_its_lock():
    """A process forked while a kernel compiled (its lock taken) must not inherit the lock: no thread of the child
    would release it, and its own compile would wait forever."""
    import os

    from steepest.core import base

    with base._COMPILE_LOCK:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if base._COMPILE_LOCK.acquire(timeout=5) else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_background_compile_pending_at_fork_is_dropped_in_the_child(monkeypatch):
    """A child forked while a background compile is pending must not wait for it (no thread of the child runs
    it): wait_compiled drops it instead of blocking, and the child's next step would compile afresh."""
    import os
    import threading

    from steepest.core import base

    release = threading.Event()

    def slow_compile(*args):
        release.wait(30)
        raise RuntimeError("never used")

    monkeypatch.setattr(base, "_compile_flat", slow_compile)
    p = torch.nn.Parameter(torch.ones(8))
    p.grad = torch.ones(8)
    opt = steepest.AdamW([p], compile="background")
    opt.step()
    assert not opt.wait_compiled(timeout=0.01)
    pid = os.fork()
    if pid == 0:
        ok = opt.wait_compiled(timeout=5) and not opt._compile_jobs
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    release.set()
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("name, kwargs, loops", [("dadapt_adam", {"weight_decay": 0.1}, 1),
                                                  ("dadapt_sgd", {"weight_decay": 0.1}, 1),
                                                  ("dog", {}, 1), ("ldog", {}, 2)])
def test_reductions_share_one_loop_over_memory(name, kwargs, loops):
    """mt.one_loop ties a pass's reductions into one loop. D-Adaptation takes a dot product over the state
    before its update and a norm of the state after: one loop that also updates (without the tie, the dot
    gets a loop of its own that reads g and s, and Adam's v, again). DoG and LDoG reduce g and x - x0 in one
    read loop (LDoG's kernel then steps in a second; without the tie and without L2 decay, which reads x into
    g, g is reduced in a loop of its own).
    Counted per slot (a global step's kernels take two tensors a call) in the C++ inductor generates for the
    kernels that reduce; the conformance battery checks the numbers against eager."""
    import logging

    from torch._inductor import config

    sources: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            sources.append(record.getMessage())

    handler = Capture()
    logger = logging.getLogger("torch._inductor")
    torch._logging.set_logs(output_code=True)
    logger.addHandler(handler)
    try:
        with config.patch({"fx_graph_cache": False}):
            params = [torch.nn.Parameter(torch.randn(300, 1000))]  # a global step's kernels pad the second slot
            for p in params:
                p.grad = torch.randn_like(p)
            opt = registry.get(name).cls(params, compile=True, **kwargs)
            opt.step()
            opt.step()
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
    kernels = [s for s in sources if "extern \"C\"" in s]
    if not kernels:
        pytest.skip("inductor's generated C++ was not logged")
    from steepest.core import base

    slots = base._FUSE_CHUNK if issubclass(registry.get(name).cls, GlobalStepOptimizer) else 1  # loops per slot
    counted = [s.count("for(int64_t x0=") for s in kernels if "tmp_acc" in s]  # the kernels that reduce
    assert counted and all(c == loops * slots for c in counted), f"{name}: {counted} loops in its reducing kernels"


def test_sqrt_and_add_write_over_a_dead_temporary_eager_only():
    """mt.sqrt / mt.add with out=: eager, the result lands in out (which may be one of the inputs) and equals
    the fresh-list result bit for bit; traced for a kernel, out is left alone and a new value comes back."""
    from steepest.core import multitensor as mt

    xs = [torch.rand(5, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)]
    ys = [torch.randn(5, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)]
    fresh_sum, fresh_root = mt.add(xs, ys, 0.3), mt.sqrt(xs)
    temp = [y.clone() for y in ys]
    buffers = [t.data_ptr() for t in temp]
    summed = mt.add(xs, temp, 0.3, out=temp)  # out aliases the second operand
    assert [t.data_ptr() for t in summed] == buffers
    assert all(torch.equal(a, b) for a, b in zip(summed, fresh_sum))
    rooted = mt.sqrt(xs, out=temp)
    assert [t.data_ptr() for t in rooted] == buffers
    assert all(torch.equal(a, b) for a, b in zip(rooted, fresh_root))
    untouched = [y.clone() for y in ys]
    with mt.tracing():
        traced = mt.sqrt(xs, out=untouched)
    assert all(torch.equal(a, b) for a, b in zip(untouched, ys))
    assert all(torch.equal(a, b) for a, b in zip(traced, fresh_root))


@pytest.mark.parametrize("name", ["adan", "dadapt_adam"])
def test_kernels_called_past_their_wrappers_match_the_wrapped_calls(name, monkeypatch):
    """The fused path calls inductor's generated code directly (the compile stack's wrappers cost ~5-16 us a
    call): the same numbers, bit for bit, as calls through the wrappers, for an elementwise update (Adan) and a
    pass that returns reductions (D-Adaptation Adam); autocast turns the direct call off."""
    from steepest.core import base

    def make():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(300, 40), (5000,), (7, 3, 5)]]

    direct_params, wrapped_params = make(), make()
    direct = registry.get(name).cls(direct_params, compile=True)
    wrapped = registry.get(name).cls(wrapped_params, compile=True)
    with recording_fused_calls() as calls:
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            grads = [torch.randn(p.shape, generator=g) for p in direct_params]
            for params in (direct_params, wrapped_params):
                for p, grad in zip(params, grads):
                    p.grad = grad.clone()
            direct.step()
            with monkeypatch.context() as m:
                m.setattr(base, "_direct_calls_allowed", lambda: False)
                wrapped.step()
    # Both optimizers ran their kernels over every tensor at every step (else both step eager, and agree).
    for opt in (direct, wrapped):
        recorded = calls.assert_all_fused(opt=opt)
        assert len(recorded) >= 4 and all(len(c.done) == 3 for c in recorded)
    kernels = [k for k in direct._kernels.values() if k is not None]
    assert kernels
    if any(k.direct is None for k in kernels):
        pytest.skip("this torch's compiled artifacts do not expose their generated code")
    for a, b in zip(direct_params, wrapped_params):
        assert torch.equal(a, b)
        for key in direct.state[a]:
            assert torch.equal(torch.as_tensor(direct.state[a][key]), torch.as_tensor(wrapped.state[b][key]))
    assert base._direct_calls_allowed()
    with torch.autocast("cpu"):
        assert not base._direct_calls_allowed()


@pytest.mark.parametrize("name", ["dog", "ldog", "prodigy"])
def test_stochastic_rounding_by_default_keys_only_bfloat16_kernels_as_stochastic(name):
    """Prodigy, DoG and LDoG round bfloat16 params stochastically by default; float32 params have nothing to round,
    so their kernels are the plain ones, called past their wrappers (keyed as stochastic, every call paid the
    wrappers: DoG over 300 small tensors 7.6 ms a step fused, against 4.4 ms plain). bfloat16 buckets, and float32
    params with bfloat16 states, keep stochastic rounding."""
    def make(dtype):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in [(300, 40), (5000,)]]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        return params

    cls = registry.get(name).cls
    plain = cls(make(torch.float32), compile=True)
    assert plain.stochastic_rounding
    with recording_fused_calls() as calls:
        for _ in range(2):
            plain.step()
    calls.assert_all_fused(opt=plain)
    control = registry.get("adamw").cls(make(torch.float32), compile=True)
    control.step()
    if any(k is None or k.direct is None for k in control._kernels.values()):
        pytest.skip("this torch's compiled artifacts do not expose their generated code")
    kernels = [k for k in plain._kernels.values() if k is not None]
    assert kernels and all(k.direct is not None for k in kernels)
    group = plain.param_groups[0]
    params = group["params"]
    states = {k: [plain.state[p][k] for p in params] for k in plain.state_names(plain.state[params[0]], group)}
    assert not plain.rounds_stochastically(params, states)
    bf16 = make(torch.bfloat16)
    assert cls(bf16).rounds_stochastically(bf16, {})
    assert not cls(bf16, stochastic_rounding=False).rounds_stochastically(bf16, {})
    states_bf16 = {"x": [torch.zeros(3, dtype=torch.bfloat16)]}
    assert cls(make(torch.float32), state_dtype=torch.bfloat16).rounds_stochastically(params, states_bf16)


@pytest.mark.parametrize("name", ["adamw", "adamp", "ldog"])
def test_strided_params_whose_order_the_kernel_cannot_take_step_eager(name):
    """A dense param in another memory order is fused only where its kernel sees the same entries: a transposed
    matrix (its rows strided through memory) is no row-major matrix view for AdamP's per-row sums (eager), while
    elementwise and whole-tensor updates step it flat; a gradient in another order than its param's (assigned by
    hand) sends that param to the eager path for the step. Every case equals the contiguous run."""
    def make(transposed):
        g = torch.Generator().manual_seed(0)
        base = torch.randn(30, 40, generator=g)
        weight = base.t().contiguous().t() if transposed else base.clone()  # same values, column-major if transposed
        conv = torch.randn(8, 3, 3, 3, generator=g)
        params = [torch.nn.Parameter(weight), torch.nn.Parameter(conv.contiguous(memory_format=torch.channels_last)
                                                                 if transposed else conv)]
        return params

    def run(transposed, contiguous_grads=False):
        params = make(transposed)
        opt = registry.get(name).cls(params, compile=True)
        for step in range(3):
            g = torch.Generator().manual_seed(10 + step)
            for p in params:
                grad = torch.randn(p.shape, generator=g)
                if transposed and not contiguous_grads:  # the param's own order, as autograd gives it
                    grad = grad.t().contiguous().t() if p.dim() == 2 else grad.contiguous(
                        memory_format=torch.channels_last)
                p.grad = grad
            with recording_fused_calls() as calls:
                opt.step()
        return [p.detach().clone() for p in params], [c.planned for c in calls]

    reference, planned = run(False)
    assert planned == [[0, 1]]
    strided, planned = run(True)
    assert planned == ([[1]] if registry.get(name).cls.matrix_view else [[0, 1]])
    mixed, planned = run(True, contiguous_grads=True)
    assert planned in ([], [[]])
    for a, b, c in zip(reference, strided, mixed):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)


def test_eager_sums_of_channels_last_tensors_read_them_in_place():
    """mt.dots / mt.squared_norms on dense tensors in another order (channels_last params, their gradients and
    states) take views of their memory, not reshape's copies (a pass and a temporary each: LDoG's eager step on
    a channels_last ResNet-18 layout took 1.9x the contiguous one, now 1.0); pairs in different orders, or with
    gaps, still pair entries by index. Values against float64 sums over index order. mt.flat_pieces cuts them
    along their memory too (Prodigy's eager step there: 1.17x the contiguous one, now 0.95), and mt.rows takes the
    rows of AdamP's per-channel sums in place (AdamP 2.16x, now 0.97)."""
    from steepest.core import multitensor as mt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randn(6, 5, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    z = torch.randn(6, 5, 3, 3, generator=g)  # contiguous: another memory order than x's
    gapped = torch.randn(6, 10, 3, 3, generator=g)[:, ::2]
    for a, b in ((x, y), (x, z), (z, x), (x, gapped), (gapped, gapped)):
        want = (a.double() * b.double()).sum()
        torch.testing.assert_close(mt.dots([a], [b])[0].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mt.squared_norms([x])[0].double(), (x.double() ** 2).sum(), rtol=1e-5, atol=0)
    assert mt.dense(x) and mt.dense(x.transpose(0, 3)) and not mt.dense(gapped)
    for a, b in ((x, y), (x, x)):
        view = mt.flat(a, b)
        assert view.data_ptr() == a.data_ptr() and view.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert mt.flat(x, z).data_ptr() != x.data_ptr()  # a copy in index order, to pair with z's
    # Rows (AdamP's per-output-channel sums): row i holds x[i]'s entries, in place where dim 0 is outermost.
    row_view = mt.rows(x, 6, y)
    assert row_view.data_ptr() == x.data_ptr()
    torch.testing.assert_close(mt.row_dots(row_view, mt.rows(y, 6, x)), (x * y).flatten(1).sum(1))
    torch.testing.assert_close(row_view.sum(1), x.flatten(1).sum(1))
    turned = x.transpose(0, 1)  # dense, but its dim 0 is not outermost: rows in index order, copied
    torch.testing.assert_close(mt.rows(turned, 5, turned).sum(1), turned.flatten(1).sum(1))
    # Eager pieces of a large update: channels_last tensors in one order are cut along their memory, and writes
    # through the pieces land in them; orders that differ stay whole.
    before = x.clone()
    calls = mt.flat_pieces([x], [y], size=64, min_numel=100)
    assert len(calls) == -(-x.numel() // 64)
    for xs, ys in calls:
        xs[0].add_(ys[0])
    assert torch.equal(x, before + y)
    assert len(mt.flat_pieces([x], [z], size=64, min_numel=100)) == 1


@pytest.mark.parametrize("name", ["adamw", "prodigy", "ldog"])
def test_states_follow_their_params_into_channels_last(name):
    """A model moved to (or back from) channels_last after its optimizer states were made
    (``model.to(memory_format=...)`` replaces each param's data), or a checkpoint of a contiguous run loaded onto
    channels_last params, left states
    in another order than their params: those params stepped eager from then on (2.7-4.5x the fused step). The
    states now take their param's order (same values, new tensors) and every tensor steps fused; the run equals
    the contiguous one."""
    import io

    cls = registry.get(name).cls

    def make():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(8, 6, 3, 3, generator=g)) for _ in range(2)]

    def grads(params, step):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:  # in the param's order, as autograd gives it
            p.grad = torch.randn(p.shape, generator=g).contiguous(
                memory_format=torch.contiguous_format if p.is_contiguous() else torch.channels_last)

    def run(opt, params, steps):
        with recording_fused_calls() as calls:
            for step in steps:
                grads(params, step)
                opt.step()
        return calls.since(0, opt)

    reference = make()
    run(cls(reference, compile=True), reference, range(5))
    moved = make()
    opt = cls(moved, compile=True)
    run(opt, moved, range(2))
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    with torch.no_grad():
        for p in moved:  # what nn.Module.to(memory_format=torch.channels_last) does to each param
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    calls = run(opt, moved, range(2, 5))
    assert calls and all(c.given == len(c.planned) == len(c.done) for c in calls)
    for p in moved:
        assert all(v.stride() == p.stride() for v in opt.state[p].values()
                   if isinstance(v, torch.Tensor) and v.shape == p.shape)
    back = [torch.nn.Parameter(p.detach().clone()) for p in moved]  # and back to contiguous, states and all
    back_opt = cls(back, compile=True)
    back_opt.load_state_dict(opt.state_dict())
    with torch.no_grad():
        for p in back:
            p.data = p.data.contiguous()
    calls = run(back_opt, back, [5])
    assert calls and all(c.given == len(c.planned) == len(c.done) for c in calls)

    loaded = make()
    with torch.no_grad():
        for p in loaded:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    opt = cls(loaded, compile=True)
    saved.seek(0)
    opt.load_state_dict(torch.load(saved, weights_only=True))  # states of the contiguous run's first 2 steps
    fresh = make()  # its params after those 2 steps
    run(cls(fresh, compile=True), fresh, range(2))
    with torch.no_grad():
        for p, q in zip(loaded, fresh):
            p.copy_(q)
    calls = run(opt, loaded, range(2, 5))
    assert calls and all(c.given == len(c.planned) == len(c.done) for c in calls)
    for a, b, c in zip(reference, moved, loaded):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)


def test_compiling_a_kernel_leaves_the_random_number_stream_alone():
    """Compiling and checking a fused kernel (its direct call is compared with the wrapped one on random inputs)
    draws nothing from the process's generator: a training loop's random numbers are the same with a fused
    optimizer as without one."""
    torch.manual_seed(5)
    expected = torch.rand(8)
    torch.manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(300, 7)) for _ in range(3)]
    torch.manual_seed(5)
    for p in params:
        p.grad = torch.ones_like(p)
    steepest.Adan(params, compile=True).step()
    assert torch.equal(torch.rand(8), expected)


def test_compiled_reductions_accumulate_in_float64():
    """Compiled, the norms and dot products of float32 tensors are summed in float64 (mt.wide_sum): on 3M
    elements they equal the float64 sum of the float32 products rounded once, where inductor's own float32 sum
    is off by 5e-5 relative here."""
    from steepest.core import multitensor as mt

    x = torch.full((3_000_001,), 0.3)
    x[::7] = 1.7
    y = torch.linspace(-1.0, 2.0, x.numel())
    expected = {"squared_norms": (x * x).double().sum().float(), "dots": (x * y).double().sum().float(),
                "l1_norms": y.abs().double().sum().float(), "norms": (x * x).double().sum().sqrt().float()}
    compiled = {
        "squared_norms": torch.compile(lambda a: mt.squared_norms([a])[0], dynamic=True, fullgraph=True)(x),
        "dots": torch.compile(lambda a, b: mt.dots([a], [b])[0], dynamic=True, fullgraph=True)(x, y),
        "l1_norms": torch.compile(lambda a: mt.l1_norms([a])[0], dynamic=True, fullgraph=True)(y),
        "norms": torch.compile(lambda a: mt.norms([a])[0], dynamic=True, fullgraph=True)(x),
    }
    for name, value in compiled.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, expected[name]), (name, value.item(), expected[name].item())


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", ["dog", "alr_smag", "prodigy"])
def test_global_step_update_pass_runs_from_the_last_tensor(name, compile, monkeypatch):
    """The pass after a whole-model reduction takes the tensors from last to first (those the reduction read last
    are still in the last-level cache), in its kernels' chunks and its eager pieces; the numbers are the forward
    order's, bit for bit."""
    from steepest.core import global_step

    cls = steepest.get(name).cls

    class Forward(cls):
        def run_pass(self, *args, reverse=False, **kwargs):
            return super().run_pass(*args, reverse=False, **kwargs)

    def train(opt, params):
        for t in range(3):
            for p in params:
                p.grad = torch.cos(p.detach() * (t + 2))
            opt.step((lambda: torch.tensor(1.0)) if cls.needs_closure else None)

    shapes = [(300_000,)] * 3 if not compile else SHAPES_10  # eager: pieces of about 2**18 elements, one a tensor
    ref = _offset_params(shapes)
    train(Forward(ref, compile=compile), ref)
    params = _offset_params(shapes)
    opt = cls(params, compile=compile)
    order = {id(p): i for i, p in enumerate(params)}
    seen = []
    original = global_step._apply_update

    def recorded(fn, ps, *args, **kwargs):
        seen.append((fn.__name__, [order.get(id(p)) for p in ps]))
        return original(fn, ps, *args, **kwargs)

    monkeypatch.setattr(global_step, "_apply_update", recorded)
    with recording_fused_calls() as calls:
        train(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(params, ref))
    if compile:
        # Per step: the reducing pass's kernels from the first tensor, the update pass's from the last chunk.
        fused = calls.assert_all_fused(opt=opt)
        steady = fused[-2:]
        assert steady[0].done == sorted(steady[0].done) and steady[1].done[0] > steady[1].done[-1]
    else:
        pieces = [idx for fn, idx in seen if fn == "descend"][-3:]  # the last step's
        assert pieces == [[2], [1], [0]]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "fused"])
def test_scaled_products_are_taken_in_atens_order(compile):
    """value * a * b is (value a) b, as ATen's addcmul computes it: with float32 gradients of 1e20, a * b alone
    overflows, (1 - b2) g first does not. Both paths follow torch.optim.AdamW, whose second moment stays finite."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(2)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = steepest.AdamW(ours, lr=1e-2, compile=compile)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=True)
    for _ in range(3):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p) * 1e20
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert torch.isfinite(opt.state[p]["exp_avg_sq"]).all()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["AdamW", "DoG"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "fused"])
def test_step_wrapped_in_torch_compile_equals_the_plain_step(name, compile):
    """``torch.compile(opt.step)``, as training loops written for torch.optim do, runs and takes the plain step
    (float32 rounding apart: the traced arithmetic is compiled)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 40, generator=g)) for _ in range(3)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    start = params[0].detach().clone()
    opt, plain = (getattr(steepest, name)(ps, lr=0.1, compile=compile) for ps in (params, ref))
    step = torch.compile(opt.step)
    for t in range(3):
        for a, b in zip(params, ref):
            a.grad = torch.sin(a.detach() * (t + 1))
            b.grad = torch.sin(b.detach() * (t + 1))
        step()
        plain.step()
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(params[0], start)


@pytest.mark.parametrize("name", ["AdamW", "DoG"])
def test_zero_redundancy_optimizer_takes_steepest_classes(name):
    """torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=steepest.X) (one gloo rank) takes the plain
    optimizer's steps, and consolidates a state_dict."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model, twin = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
        twin.load_state_dict(model.state_dict())
        start = model.weight.detach().clone()
        x = torch.randn(8, 5)
        cls = getattr(steepest, name)
        # The optimizer's own options pass through ZeroRedundancyOptimizer's param groups.
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=1e-2, compile=False,
                                       skip_nonfinite=True)
        plain = cls(twin.parameters(), lr=1e-2, compile=False)
        for _ in range(3):
            for opt, m in ((zero, model), (plain, twin)):
                opt.zero_grad()
                m(x).square().sum().backward()
                opt.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)
        assert not torch.equal(model.weight, start)
        zero.consolidate_state_dict(0)
        assert len(zero.state_dict()["state"]) == 2
    finally:
        dist.destroy_process_group()


def test_eager_step_of_a_tensor_taken_in_pieces_equals_torch_optim():
    """A tensor of 2**21 + 1000 elements steps eager in flat pieces (the last one short): equal to
    torch.optim.AdamW's single-tensor step."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn((1 << 21) + 1000, generator=g, dtype=torch.float64)
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = steepest.AdamW([ours], lr=1e-2, weight_decay=0.1, compile=False)
    theirs = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=False)
    assert len(opt._eager_pieces([ours], [w], {"exp_avg": [w], "exp_avg_sq": [w]})) == 9
    for t in range(3):
        grad = torch.cos(w * (t + 1))
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        theirs.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[ours]["exp_avg_sq"], theirs.state[ref]["exp_avg_sq"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["prodigy", "dadapt_adam"])
def test_global_step_pass_of_a_tensor_taken_in_pieces_equals_the_authors_package(name):
    """The eager passes of a global-step method take a tensor of 2**21 + 1000 elements in flat pieces, their sums
    added up: the run equals the authors' package on the whole tensor."""
    reference = {"prodigy": lambda ps: pytest.importorskip("prodigyopt").Prodigy(ps, lr=1.0, weight_decay=0.01),
                 "dadapt_adam": lambda ps: pytest.importorskip("dadaptation").DAdaptAdam(ps, lr=1.0)}[name]
    g = torch.Generator().manual_seed(0)
    w = torch.randn((1 << 21) + 1000, generator=g, dtype=torch.float64)
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    kwargs = {"weight_decay": 0.01} if name == "prodigy" else {}
    opt = steepest.get(name).cls([ours], lr=1.0, compile=False, **kwargs)
    theirs = reference([ref])
    # A quadratic whose curvature grows along the tensor (each piece's sums differ from the others'), so that d
    # grows from its start (~75x in 6 steps): the trajectory depends on every sum.
    ramp = torch.linspace(1e-3, 3e-2, w.numel(), dtype=torch.float64) ** 2
    for t in range(6):
        for p in (ours, ref):
            p.grad = ramp * (p.detach() - 0.5) + 1e-4 * torch.cos(w * (t + 1))
        opt.step()
        theirs.step()
    assert opt.param_groups[0]["d"] > 50 * opt.param_groups[0]["d0"]
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-10, atol=1e-12)
    assert opt.param_groups[0]["d"] == pytest.approx(theirs.param_groups[0]["d"], rel=1e-10)


def test_row_dots_in_blocks_equal_the_dense_products():
    """mt.row_dots takes a matrix of 2**21+ elements in blocks of rows (the last one short) and one row by
    torch.dot: the numbers of the float64 products summed row by row."""
    from steepest.core import multitensor as mt

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3001, 1000, generator=g, dtype=torch.float64) for _ in range(2))
    want = (a * b).sum(1)
    torch.testing.assert_close(mt.row_dots(a, b), want, rtol=1e-12, atol=1e-12)
    one = mt.row_dots(a.reshape(1, -1), b.reshape(1, -1))
    assert one.shape == (1,)
    torch.testing.assert_close(one, want.sum().reshape(1), rtol=1e-12, atol=1e-9)


def test_stochastic_rounding_asked_for_float16_params_warns_that_it_rounds_to_nearest():
    """Stochastic rounding writes bfloat16 storage only: asked for with float16 params it says so (and that
    float32 or bfloat16 params are the way), instead of rounding to nearest silently; not asked for, no warning."""
    import warnings

    half = [torch.nn.Parameter(torch.ones(3, dtype=torch.float16))]
    with pytest.warns(UserWarning, match="float16 params are written rounded to nearest"):
        steepest.AdamW(half, stochastic_rounding=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steepest.AdamW(half)
        steepest.AdamW([torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))], stochastic_rounding=True)
