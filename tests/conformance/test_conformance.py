"""The conformance battery (DESIGN.md section 4), applied to every registered optimizer."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import steepest  # noqa: F401 - fills the registry
from steepest.core.base import compiled_graphs
from steepest.core.registry import methods

from ..fused_calls import recording_fused_calls
from .problem import SHAPES, closure_for, loss_fn, make_opt, make_params, run, snapshot

METHODS = [m for m in methods() if issubclass(m.cls, torch.optim.Optimizer)]


def applies(info, check):
    if check in info.conformance_skip:
        pytest.skip(f"{info.name}: {info.conformance_skip[check]}")


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def close(a, b, rtol, atol=0.0):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.fixture(params=METHODS, ids=[m.name for m in METHODS])
def info(request):
    return request.param


def test_registered_metadata(info):
    assert info.cls.__doc__ and "arXiv" in info.cls.__doc__ or not info.arxiv
    assert info.state_words >= 0
    assert info.cls.hyperparams, "every method validates its hyperparameters"


def test_bad_hyperparameters_raise_naming_the_parameter(info):
    for key, check in info.cls.hyperparams.items():
        bad = getattr(check, "bad_example", None)
        if bad is None or key in info.conformance_skip.get("bad_values", ""):
            continue
        params = make_params()
        with pytest.raises((ValueError, TypeError), match=key):
            make_opt(info, params, **{key: bad})


def test_engine_options_are_checked(info):
    """state_dtype float16 is refused naming bfloat16 (squared gradients below ~2.4e-4 underflow to 0 there: AdamW
    with gradients of 1e-4 took steps of lr m / eps), other dtypes and non-boolean switches name the option."""
    for kwargs, match in [(dict(state_dtype=torch.float16), r"state_dtype=torch.float16 .*torch.bfloat16"),
                          (dict(state_dtype=torch.int32), r"state_dtype must be"),
                          (dict(compile="yes"), r"compile must be"),
                          (dict(stochastic_rounding=1), r"stochastic_rounding"),
                          (dict(skip_nonfinite="no"), r"skip_nonfinite")]:
        with pytest.raises((ValueError, TypeError), match=match):
            make_opt(info, make_params(), **kwargs)


def test_torch_implementation_switches_accepted_at_torch_defaults_refused_otherwise(info):
    """A line written for torch.optim (foreach=None, fused=None, capturable=False, differentiable=False) runs as it
    is; asking for one of torch's kernels names compile=, the switch that does it here."""
    make_opt(info, make_params(), foreach=None, fused=None, capturable=False, differentiable=False)
    for key in ("fused", "foreach"):
        with pytest.raises(TypeError, match=rf"{key}=True .*compile="):
            make_opt(info, make_params(), **{key: True})
    for key in ("capturable", "differentiable"):
        with pytest.raises(TypeError, match=rf"{key}=True .*not supported"):
            make_opt(info, make_params(), **{key: True})


def test_invalid_param_group_changes_nothing(info):
    params = make_params()
    opt = make_opt(info, params[:2])
    before = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": params[2:], "lr": -1.0})
    with pytest.raises(ValueError, match="unknown option"):
        opt.add_param_group({"params": params[2:], "learning_rate": 1.0})
    assert len(opt.param_groups) == len(before)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in before]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "fused"])
def test_param_resized_after_its_state_was_made_is_refused_before_any_change(info, compile):
    """p.data replaced by a larger tensor (an embedding grown in place): the step refuses it, naming the param,
    the state and the fix, before anything changes (eager, the broadcast error came after the params before it
    had stepped; fused, the kernel ran on states too short); after ``del opt.state[p]`` it steps again."""
    if compile:
        applies(info, "compile")
    params = make_params()
    opt = make_opt(info, params, compile=compile)
    opt.step(closure_for(opt, params))
    if not any(isinstance(v, torch.Tensor) and v.shape == params[0].shape for v in opt.state[params[0]].values()):
        pytest.skip(f"{info.name} keeps no state shaped like the param")
    params[0].data = torch.randn(7, 4, dtype=params[0].dtype)
    before, state = snapshot(params), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"param 0 of group 0 has shape \(7, 4\) but its state .* shape \(5, 4\)"):
        opt.step(closure_for(opt, params))
    assert same(params, before)
    after = opt.state_dict()
    assert all(same([a[k]], [b[k]]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
               for a, b in zip(after["state"].values(), state["state"].values()) for k in a)
    del opt.state[params[0]]
    opt.step(closure_for(opt, params))
    assert not same(params, before)


def test_param_groups_equal_separate_optimizers(info):
    applies(info, "param_groups")
    lr = info.example_kwargs.get("lr", 1e-3)
    a = make_params()
    opt = make_opt(info, [{"params": a[:2]}, {"params": a[2:], "lr": lr * 0.5}])
    b = make_params()
    o1, o2 = make_opt(info, b[:2]), make_opt(info, b[2:], lr=lr * 0.5)
    if info.cls.needs_closure:
        pytest.skip("a closure-driven method re-evaluates the loss itself")
    for _ in range(4):
        opt.step(closure_for(opt, a))
        loss = loss_fn(b)
        o1.zero_grad()
        o2.zero_grad()
        loss.backward()
        o1.step()
        o2.step()
    assert same(a, b)


def test_closure_returns_loss(info):
    params = make_params()
    opt = make_opt(info, params)
    closure = closure_for(opt, params)
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and torch.isclose(loss, loss_fn(make_params()))


def test_params_without_grad_are_skipped(info):
    params = make_params()
    frozen = params[1]
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = make_opt(info, params)
    for _ in range(3):
        opt.step(closure_for(opt, params))
    assert torch.equal(frozen, before)
    assert len(opt.state[frozen]) == 0


def test_step_with_no_grads_is_a_noop(info):
    applies(info, "no_grad_noop")
    params = make_params()
    opt = make_opt(info, params)
    before = snapshot(params)
    opt.step(lambda: torch.tensor(0.0)) if info.cls.needs_closure else opt.step()
    assert same(params, before)
    assert all(len(s) == 0 for s in opt.state.values())


def test_sparse_gradients_rejected_before_any_change(info):
    params = make_params()
    opt = make_opt(info, params)
    opt.step(closure_for(opt, params))
    state_before = copy.deepcopy(opt.state_dict())
    before = snapshot(params)
    for p in params:
        p.grad = torch.ones_like(p)
    params[-1].grad = params[-1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(lambda: torch.tensor(0.0))
    assert same(params, before)
    assert str(opt.state_dict()) == str(state_before)


def test_maximize_equals_negated_gradient(info):
    applies(info, "maximize")
    a, b = make_params(), make_params()
    oa = make_opt(info, a, maximize=True)
    ob = make_opt(info, b)
    for _ in range(4):
        for pa, pb in zip(a, b):
            g = torch.cos(3 * pb.detach()) + 0.1
            pa.grad = -g.clone()
            pb.grad = g.clone()
        oa.step(lambda: torch.tensor(0.0))
        ob.step(lambda: torch.tensor(0.0))
    close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("via", ["direct", "torch_save", "deepcopy"])
def test_state_dict_round_trip_continues_bit_for_bit(info, via):
    params, opt = run(info, steps=3)
    sd = opt.state_dict()
    if via == "torch_save":
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    elif via == "deepcopy":
        sd = copy.deepcopy(sd)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make_opt(info, twin, lr=0.12345)  # loading restores the saved lr too
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for _ in range(3):
        opt.step(closure_for(opt, params))
        opt2.step(closure_for(opt2, twin))
    assert same(params, twin)


def test_deepcopy_of_optimizer_and_params_continues_bit_for_bit(info):
    """copy.deepcopy of (params, optimizer) together, as a training snapshot does: the copy keeps every setting
    (engine options such as skip_nonfinite, counters) and steps exactly as the original."""
    params, opt = run(info, steps=2, skip_nonfinite=True)
    opt.skipped_steps = 3
    params2, opt2 = copy.deepcopy((params, opt))
    assert opt2.skip_nonfinite is True and opt2.skipped_steps == 3 and opt2.compile == opt.compile
    assert all(q is not p for p, q in zip(params, params2))
    assert all(q is r for q, r in zip(params2, opt2.param_groups[0]["params"]))
    for _ in range(3):
        opt.step(closure_for(opt, params))
        opt2.step(closure_for(opt2, params2))
    assert same(params, params2)


def test_state_dict_is_deterministic(info):
    _, o1 = run(info, steps=2)
    _, o2 = run(info, steps=2)
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            w = s2["state"][k][name]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w


def test_foreign_state_dict_rejected_without_change(info):
    params, opt = run(info, steps=2)
    before = copy.deepcopy(opt.state_dict())
    other = steepest.SGD if info.cls is not steepest.SGD else steepest.AdamW
    foreign_params = make_params()
    fo = other(foreign_params, lr=1e-3, **({"momentum": 0.9} if other is steepest.SGD else {}))
    fo.step(closure_for(fo, foreign_params))
    with pytest.raises(ValueError):
        opt.load_state_dict(fo.state_dict())
    # Same optimizer, another parameter layout.
    shapes = [(4, 5), (7,), (1,), (3, 2, 2)]
    _, other_layout = run(info, steps=2, params=make_params(shapes=shapes))
    if any(len(s) > 0 for s in other_layout.state.values()) and any(
        torch.is_tensor(v) and v.dim() > 0 for s in other_layout.state.values() for v in s.values()
    ):
        with pytest.raises(ValueError, match="shape|layout"):
            opt.load_state_dict(other_layout.state_dict())
    assert str(opt.state_dict()) == str(before)


def test_eager_and_compiled_agree_without_recompiles(info):
    applies(info, "compile")
    from torch._dynamo.utils import counters

    eager, _ = run(info, steps=2, compile=False)
    params = make_params()
    opt = make_opt(info, params, compile=True)
    extern = counters["inductor"]["extern_calls"]
    opt.step(closure_for(opt, params))
    # An op without a compiler lowering runs as a separate eager call on materialised temporaries: an extra
    # pass over memory that the fused step exists to avoid.
    assert counters["inductor"]["extern_calls"] == extern, "the fused step calls ops outside the compiled kernel"
    graphs = compiled_graphs()
    opt.step(closure_for(opt, params))
    for _ in range(3):  # changing the learning rate between steps must not recompile either
        for g in opt.param_groups:
            g["lr"] = g["lr"] * 0.9
        opt.step(closure_for(opt, params))
    assert compiled_graphs() == graphs, "the fused kernel recompiled after its first step"
    with recording_fused_calls() as calls:
        fused2, fused_opt = run(info, steps=2, compile=True)
    # A kernel, not the eager fallback, updated the tensors it was planned for, at every pass of both steps (methods
    # that compile through the engine's kernels; matrix methods compile their own steps).
    if fused_opt._kernels:
        calls.assert_all_fused(opt=fused_opt)
    close(fused2, eager, rtol=1e-9, atol=1e-12)


def test_channels_last_params_step_as_contiguous_ones(info):
    """Conv weights in channels_last (``model.to(memory_format=torch.channels_last)``, the layout CNN training
    uses) hold their elements in another order, gap-free: the fused path steps them over their memory as it lies
    (their gradients and states share that order), so every tensor is planned and done by a kernel, and the run
    equals the contiguous one. Before, they went eager: on a ResNet-18 layout the step took 2.7-4.5x the
    contiguous fused step (AdamW 2.71, AdamP 3.14, Prodigy 3.70, LDoG 4.48); now 1.03-1.08."""
    applies(info, "compile")
    shapes = [(4, 3, 3, 3), (6, 4, 2, 2), (5,), (3, 5)]

    def run_layout(layout, compile):
        params = [torch.nn.Parameter(p.detach().contiguous(memory_format=layout) if p.dim() == 4 else p.detach())
                  for p in make_params(shapes=shapes)]
        opt = make_opt(info, params, compile=compile)
        for _ in range(3):
            opt.step(closure_for(opt, params))
        return [p.detach().clone() for p in params], opt

    contiguous, _ = run_layout(torch.contiguous_format, True)
    with recording_fused_calls() as calls:
        strided, opt = run_layout(torch.channels_last, True)
    assert not strided[0].is_contiguous() and strided[0].is_contiguous(memory_format=torch.channels_last)
    if opt._kernels:
        recorded = calls.assert_all_fused(opt=opt)
        # every conv weight was planned for a kernel, not left to the eager path
        assert all(c.given == len(c.planned) for c in recorded), [(c.given, c.planned) for c in recorded]
    close(strided, contiguous, rtol=1e-9, atol=1e-12)
    eager, _ = run_layout(torch.channels_last, False)
    close(eager, contiguous, rtol=1e-9, atol=1e-12)


def test_step_inside_a_callers_torch_compile_is_left_to_the_optimizer(info):
    """torch.compile around step() (the pattern torch.optim's docs show) reaches the step as a graph break: the
    optimizer runs its own eager or fused kernels, so no graph is traced through the update, nothing recompiles
    as the step count grows, and the steps equal the uncompiled run's bit for bit."""
    from torch._dynamo.utils import counters

    want, _ = run(info, steps=4)
    params = make_params()
    torch.manual_seed(0)
    opt = make_opt(info, params)
    torch._dynamo.reset()
    counters["stats"].clear()
    step = torch.compile(opt.step)
    for _ in range(4):
        step(closure_for(opt, params))
    assert not counters["stats"]["unique_graphs"], "a graph was traced through the step"
    assert same(params, want)


def test_step_inside_a_callers_autocast_runs_outside_it(info):
    """A training loop written as one torch.autocast block calls step() inside it: the update runs outside it
    (float32 params: autocast would take the matrix methods' products and the Hessian methods' products to
    bfloat16) and equals the step taken outside it, while a closure runs under the caller's autocast."""
    seen = []

    def closure_of(opt, params):
        inner = closure_for(opt, params)

        def closure():
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            with torch.autocast("cpu", enabled=False):  # the same loss either way: only the step is compared
                return inner()

        return closure

    def steps(autocast):
        params = make_params(torch.float32)
        torch.manual_seed(0)
        opt = make_opt(info, params)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                opt.step(closure_of(opt, params))
        return params

    want = steps(False)
    seen.clear()
    assert same(steps(True), want)
    assert seen and all(s == (True, torch.bfloat16) for s in seen), seen


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "fused"])
def test_step_counts_as_an_in_place_change_of_the_params(info, compile):
    """A graph that saved the params before a step cannot be back-propagated through after it: autograd sees
    the step's writes (version counters), eager or fused, as it sees torch.optim's."""
    if compile:
        applies(info, "compile")
    params = make_params()
    opt = make_opt(info, params, compile=compile)
    opt.step(closure_for(opt, params))
    held = [(p * p).sum() for p in params]  # each product saves its param itself for its backward
    before = snapshot(params)
    opt.step(closure_for(opt, params))
    changed = [i for i, (p, b) in enumerate(zip(params, before)) if not torch.equal(p, b)]
    assert changed, "the step changed no param"
    for i in changed:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            held[i].backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_tracks_float64(info, dtype):
    applies(info, "dtypes")
    ref, _ = run(info, steps=5, dtype=torch.float64)
    got, opt = run(info, steps=5, dtype=dtype)
    assert all(p.dtype == dtype for p in got)
    for s in opt.state.values():
        for v in s.values():
            if torch.is_tensor(v) and v.is_floating_point():
                assert v.dtype == (torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    for a, b in zip(got, ref):
        assert torch.isfinite(a.float()).all()
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * 10)
    tracking = {torch.bfloat16: "bf16_tracking", torch.float16: "fp16_tracking"}.get(dtype)
    if tracking is not None and tracking not in info.conformance_skip:
        # Where the float64 run moved an entry by more than two 16-bit spacings, the 16-bit storage moved too,
        # the same way (a stored param that never takes its updates passes the tolerance above).
        start = make_params()
        for a, b, s in zip(got, ref, start):
            stored = s.to(dtype).double()
            spacing = torch.finfo(dtype).eps * stored.abs().clamp_min(torch.finfo(dtype).tiny)
            far = (b.detach() - s).abs() > 2 * spacing
            assert torch.equal(torch.sign(a.double() - stored)[far], torch.sign(b.detach() - s)[far])


@pytest.mark.parametrize("case", ["bf16 params", "bf16 states"])
def test_fused_low_precision_matches_eager(info, case):
    """The compiled kernel's float32 working copies and write-back into bfloat16 storage (params, or states
    rounded to nearest) give the eager path's numbers, up to a bfloat16 rounding here and there."""
    applies(info, "compile")
    applies(info, "dtypes")
    kw = (dict(dtype=torch.bfloat16) if case == "bf16 params"
          else dict(dtype=torch.float32, state_dtype=torch.bfloat16, stochastic_rounding=False))
    eager, _ = run(info, steps=4, compile=False, **kw)
    with recording_fused_calls() as calls:
        fused, fused_opt = run(info, steps=4, compile=True, **kw)
    if fused_opt._kernels:
        calls.assert_all_fused(opt=fused_opt)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-2, atol=2e-3)


def test_bfloat16_states_with_stochastic_rounding(info):
    applies(info, "dtypes")
    got, opt = run(info, steps=5, dtype=torch.float32, state_dtype=torch.bfloat16)
    ref, _ = run(info, steps=5, dtype=torch.float32)
    # Buffers, but for initial points kept exact (exact_states), matrices a root or inverse is taken of
    # (precise_state_prefixes) and one number per tensor (LDoG's growing sum G), which a method may keep in float32.
    def kept_precise(k):
        return k in opt.exact_states or k.startswith(opt.precise_state_prefixes)

    floating = [v for s in opt.state.values() for k, v in s.items()
                if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1 and not kept_precise(k)]
    assert all(v.dtype == torch.bfloat16 for v in floating)
    exact = [v for s in opt.state.values() for k, v in s.items() if kept_precise(k)]
    assert all(v.dtype == torch.float32 for v in exact)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
    # The stored bfloat16 states follow the float32 run's: each param-sized one within 5% of that state's largest
    # entry after 5 steps (measured <= 2.2% over the registry; states that never took their updates are off by
    # their whole size).
    if "bf16_state_values" in info.conformance_skip or "bf16_tracking" in info.conformance_skip:
        return
    _, ref_opt = run(info, steps=5, dtype=torch.float32)
    params = [p for group in opt.param_groups for p in group["params"]]
    ref_params = [p for group in ref_opt.param_groups for p in group["params"]]
    compared = 0
    for p, q in zip(params, ref_params):
        for k, v in opt.state[p].items():
            if torch.is_tensor(v) and v.dtype == torch.bfloat16 and v.shape == p.shape:
                want = ref_opt.state[q][k].float()
                assert (v.float() - want).abs().max() <= 0.05 * want.abs().max(), (k, p.shape)
                compared += 1
    assert compared or not floating


def test_deterministic_under_seed(info):
    a, _ = run(info, steps=4, seed=3)
    b, _ = run(info, steps=4, seed=3)
    assert same(a, b)


def test_zero_gradient_gives_no_nan(info):
    params = make_params()
    opt = make_opt(info, params)
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step(lambda: torch.tensor(0.0))
    assert all(torch.isfinite(p).all() for p in params)
    for s in opt.state.values():
        for v in s.values():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.isfinite(v).all()


def test_numbers_beyond_float32_range_give_infinities_not_errors(info):
    """lr 1e39 on float32 params: the step's coefficients leave float32's range. ATen refuses such a number as an
    alpha/value argument, with an error in the middle of a step; the step computes with the infinity instead, as
    float32 arithmetic (and the compiled path, which takes the numbers as tensors) does: eager and compiled end
    with the same entries finite."""
    masks = []
    for compile in ([False, True] if "compile" not in info.conformance_skip else [False]):
        params, _ = run(info, steps=2, dtype=torch.float32, lr=1e39, compile=compile)
        masks.append([torch.isfinite(p) for p in params])
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[-1]))


def test_zero_size_and_frozen_params(info):
    """A zero-size param with a (zero-size) gradient steps without error and changes nothing else; a frozen param
    is left alone: the others take the numbers of a run without either."""
    params = make_params()
    empty = torch.nn.Parameter(torch.zeros(0, 3, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
    torch.manual_seed(0)
    opt = make_opt(info, [*params, empty, frozen])
    inner = closure_for(opt, params)

    def closure():
        loss = inner()  # zero_grad first, then the loss's gradients
        empty.grad = torch.zeros_like(empty)
        return loss

    for _ in range(2):
        opt.step(closure)
    assert torch.equal(frozen, torch.ones(2, dtype=torch.float64)) and frozen.grad is None
    assert empty.shape == (0, 3) and empty.grad is not None
    alone, _ = run(info, steps=2)
    close(params, alone, rtol=1e-14, atol=1e-15)


def test_zero_dim_param_equals_one_element_param(info):
    # A learnable scalar (a temperature, a gain) is a 0-dim tensor: it must step as its (1,)-shaped twin.
    shapes = [s if s != (1,) else () for s in SHAPES]
    scalar, _ = run(info, steps=4, params=make_params(shapes=shapes))
    vector, _ = run(info, steps=4)
    assert scalar[shapes.index(())].shape == ()
    close([p.reshape(v.shape) for p, v in zip(scalar, vector)], vector, rtol=1e-12, atol=1e-15)


def test_tensor_lr_equals_float_lr(info):
    applies(info, "tensor_lr")
    lr = info.example_kwargs.get("lr", 1e-3)
    a, _ = run(info, steps=4, lr=lr)
    b, _ = run(info, steps=4, lr=torch.tensor(lr, dtype=torch.float64))
    assert same(a, b)


def test_complex_params_equal_view_as_real(info):
    applies(info, "complex")
    g = torch.Generator().manual_seed(1)
    z = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.complex128))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    oz, orr = make_opt(info, [z]), make_opt(info, [r])
    for t in range(4):
        gr = torch.cos(r.detach() * (t + 1))
        r.grad = gr.clone()
        z.grad = torch.view_as_complex(gr.clone())
        oz.step(lambda: torch.tensor(0.0))
        orr.step(lambda: torch.tensor(0.0))
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-13, atol=1e-15)


def test_tiny_lr_leaves_params_unchanged(info):
    applies(info, "tiny_lr")
    before = make_params()
    after, _ = run(info, steps=3, lr=1e-28)
    close(after, before, rtol=1e-15, atol=1e-15)


def test_skip_nonfinite_changes_nothing(info):
    params, opt = run(info, steps=1)
    opt.skip_nonfinite = True
    sd = copy.deepcopy(opt.state_dict())
    before = snapshot(params)
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0, 0] = float("nan")
    opt.step(lambda: torch.tensor(0.0))
    assert opt.skipped_steps == 1
    assert same(params, before)
    assert str(opt.state_dict()) == str(sd)


def test_step_hooks_and_repr(info):
    params = make_params()
    opt = make_opt(info, params)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.step(closure_for(opt, params))
    assert calls == ["pre", "post"]
    assert info.cls.__name__ in repr(opt)


def test_works_with_torch_lr_scheduler(info):
    """A scheduler's lr is the one the step uses: the same numbers as the lr set by hand before each step (that
    lr moves the params at all is test_tiny_lr_leaves_params_unchanged's)."""
    applies(info, "tensor_lr")
    params = make_params()
    opt = make_opt(info, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    lr0 = opt.param_groups[0]["lr"]
    for _ in range(3):
        opt.step(closure_for(opt, params))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * 0.125)
    by_hand = make_params()
    manual = make_opt(info, by_hand)
    for t in range(3):
        for group in manual.param_groups:
            group["lr"] = lr0 * 0.5**t
        manual.step(closure_for(manual, by_hand))
    close(params, by_hand, rtol=1e-14, atol=1e-15)


def test_named_parameters_as_params(info):
    """torch's optimizers take ``model.named_parameters()``: the steps are the plain list's, and the names land in
    the state_dict's param groups, as torch.optim keeps them."""
    named, plain = make_params(), make_params()
    names = [f"layer{i}.weight" for i in range(len(named))]
    opt = make_opt(info, list(zip(names, named)))
    ref = make_opt(info, plain)
    for _ in range(3):
        opt.step(closure_for(opt, named))
        ref.step(closure_for(ref, plain))
    assert same(named, plain)
    assert opt.state_dict()["param_groups"][0]["param_names"] == names


def test_one_cycle_momentum_is_the_momentum_the_step_uses(info):
    """OneCycleLR(cycle_momentum=True) rewrites betas[0] (or momentum) with the lr each step: the run equals setting
    both by hand before each step."""
    applies(info, "tensor_lr")
    params = make_params()
    opt = make_opt(info, params)
    group = opt.param_groups[0]
    key = next((k for k in ("betas", "momentum") if k in group), None)
    if key is None:
        pytest.skip(f"{info.name} has neither betas nor momentum")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=group["lr"], total_steps=8, cycle_momentum=True,
                                                base_momentum=0.8, max_momentum=0.9)
    # initial_lr too: the scheduler sets it, and Muon scales its AdamW fallback's lr by lr / initial_lr.
    written = ("lr", key, "initial_lr")
    used = []
    for _ in range(4):
        used.append({k: group[k] for k in written})
        opt.step(closure_for(opt, params))
        sched.step()
    assert len({u[key] for u in used}) > 1, "the scheduler moved the momentum"
    by_hand = make_params()
    manual = make_opt(info, by_hand)
    for values in used:
        manual.param_groups[0].update(values)
        manual.step(closure_for(manual, by_hand))
    close(params, by_hand, rtol=1e-14, atol=1e-15)


def test_optimizer_options_repeated_in_a_param_group(info):
    """Wrappers such as ZeroRedundancyOptimizer pass every keyword argument into each param group: the optimizer's
    own options (compile, skip_nonfinite, torch's switches) are accepted there at the optimizer's values, and a
    different value is refused naming the option, before anything is added."""
    params = make_params()
    opt = make_opt(info, [{"params": params, "compile": False, "skip_nonfinite": True, "foreach": None}],
                   compile=False, skip_nonfinite=True)
    assert "compile" not in opt.param_groups[0] and opt.skip_nonfinite
    opt.step(closure_for(opt, params))
    extra = make_params(seed=1)
    with pytest.raises(ValueError, match="compile"):
        opt.add_param_group({"params": extra, "compile": True})
    assert len(opt.param_groups) == 1
