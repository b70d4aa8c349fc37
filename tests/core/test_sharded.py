"""Global-step methods over params sharded across processes (``fsdp_in_use``): every process takes the step that one
process takes over the whole model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import steepest

from ..conformance.problem import make_params

STEPS = 6
WORLD = 2
CASES = [
    ("DoG", dict(lr=1.0)),
    ("Prodigy", dict(lr=1.0, weight_decay=1e-2)),
    ("DAdaptAdam", dict(lr=1.0)),
    ("DAdaptSGD", dict(lr=1.0, momentum=0.9)),
    ("ALRSMAG", dict(lr=0.5, momentum=0.5)),
]


def _loss(indexed):
    """A smooth non-quadratic loss, a sum of one term per tensor of the whole model (``indexed``: (index in the
    whole model, tensor) pairs), so that a shard's gradients are the whole model's."""
    total = 0.0
    for i, p in indexed:
        x = p.full_tensor() if hasattr(p, "full_tensor") else p  # a DTensor's whole tensor (differentiable)
        scale = torch.linspace(0.5, 2.0 + i, x.numel(), dtype=x.dtype).reshape(x.shape)
        total = total + (scale * (x - 0.3) ** 2).sum() + 0.1 * torch.sin(3 * x).sum()
    return total


def _train(name, kwargs, indexed, world_loss=None, poison=None, **engine):
    """STEPS steps over the tensors of ``indexed``; ``world_loss`` turns this process's loss into the whole model's;
    ``poison`` = (step, index): a NaN into that tensor's gradient at that step, if this process holds it."""
    params = [p for _, p in indexed]
    opt = getattr(steepest, name)(params, compile=False, **kwargs, **engine)
    for t in range(STEPS):
        def closure(t=t):
            opt.zero_grad()
            loss = _loss(indexed)
            loss.backward()
            for i, p in indexed:
                if poison == (t, i):
                    p.grad.view(-1)[0] = float("nan")
            return loss if world_loss is None else world_loss(loss)
        opt.step(closure)
    return opt


def _whole_model_loss(loss):
    total = loss.detach().clone()
    dist.all_reduce(total)
    return loss + (total - loss.detach())


def _worker(rank, store, out, poison):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, kwargs in CASES:
            mine = [(i, p) for i, p in enumerate(make_params()) if i % WORLD == rank]
            opt = _train(name, kwargs, mine, world_loss=_whole_model_loss, poison=poison, fsdp_in_use=True,
                         skip_nonfinite=poison is not None)
            results[name] = ({i: p.detach() for i, p in mine}, opt.skipped_steps)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _sharded_results(tmp_path, poison=None):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "out"), poison), nprocs=WORLD, join=True)
    merged = {}
    for rank in range(WORLD):
        for name, (tensors, skipped) in torch.load(tmp_path / f"out.{rank}").items():
            merged.setdefault(name, ({}, []))[0].update(tensors)
            merged[name][1].append(skipped)
    return merged


@pytest.mark.parametrize("poison", [None, (2, 1)], ids=["plain", "nan_on_one_rank"])
def test_sharded_step_equals_the_whole_model_step(tmp_path, poison):
    """Two gloo processes, each holding half of the tensors: the params equal one process's run over all of them
    (float64; the sums are only reassociated), and a NaN gradient on one process (tensor 1 at step 2) skips that
    step on both (skip_nonfinite), as one process skips it."""
    merged = _sharded_results(tmp_path, poison)
    for name, kwargs in CASES:
        params = make_params()
        opt = _train(name, kwargs, list(enumerate(params)), poison=poison, skip_nonfinite=poison is not None)
        tensors, skipped = merged[name]
        for i, p in enumerate(params):
            torch.testing.assert_close(tensors[i], p.detach(), rtol=1e-12, atol=1e-14, msg=f"{name} tensor {i}")
        assert opt.skipped_steps == (0 if poison is None else 1)
        assert skipped == [opt.skipped_steps] * WORLD


def test_fsdp_in_use_needs_torch_distributed_and_is_detected_from_fsdp_params():
    """A param flattened by FullyShardedDataParallel turns the all-reduce on by itself (as the authors' packages
    detect it); without an initialised process group the step says what is missing, before any change."""
    params = make_params()
    params[0]._fsdp_flattened = True
    opt = steepest.Prodigy(params)
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="fsdp_in_use"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert not any(opt.state[p] for p in params)


def test_fsdp_in_use_refused_where_the_step_is_not_a_sum():
    with pytest.raises(TypeError, match="fsdp_in_use"):
        steepest.MFAC(make_params(), fsdp_in_use=True)
    with pytest.raises(TypeError, match="fsdp_in_use"):
        steepest.DoG(make_params(), fsdp_in_use="yes")


def _zero_worker(rank, store, out):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, kwargs in CASES[:3]:
            params = make_params()
            opt = ZeroRedundancyOptimizer(params, optimizer_class=getattr(steepest, name), compile=False,
                                          fsdp_in_use=True, **kwargs)
            for _ in range(STEPS):
                opt.zero_grad()
                _loss(list(enumerate(params))).backward()  # every process holds the whole model's gradients
                opt.step()
            results[name] = [p.detach() for p in params]
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_zero_redundancy_optimizer_with_fsdp_in_use_takes_the_whole_model_step(tmp_path):
    """ZeroRedundancyOptimizer(optimizer_class=steepest.DoG, fsdp_in_use=True) over two processes: each steps its
    partition with the whole model's norms, and the broadcast params equal one process's run."""
    mp.spawn(_zero_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=WORLD, join=True)
    for name, kwargs in CASES[:3]:
        params = make_params()
        _train(name, kwargs, list(enumerate(params)))
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"out.{rank}")[name]
            for i, (a, b) in enumerate(zip(got, params)):
                torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14, msg=f"{name} rank {rank} tensor {i}")


# Elementwise methods, Muon (each matrix gathered whole), and the global-step ones whose numbers are sums (DTensor's
# partial sums, all-reduced).
DTENSOR_CASES = [("AdamW", dict(lr=0.05)), ("SGD", dict(lr=0.05, momentum=0.9)), ("Lion", dict(lr=0.05)),
                 ("Adan", dict(lr=0.05)), ("NAdamW", dict(lr=0.05)), ("Muon", dict(lr=0.02, adamw_lr=1e-2))] + CASES


def _dtensor_run(name, kwargs, params, compile, poison=None):
    """STEPS steps of ``name`` over ``params`` (plain or DTensor); ``poison`` = (step, index, rank): a NaN into the
    first local entry of that tensor's gradient there, on that process (on one process, rank None)."""
    opt = getattr(steepest, name)(params, compile=compile, skip_nonfinite=poison is not None, **kwargs)
    indexed = list(enumerate(params))
    for t in range(STEPS):
        def closure(t=t):
            opt.zero_grad()
            loss = _loss(indexed)
            loss.backward()
            if poison is not None and poison[0] == t:
                grad = params[poison[1]].grad
                local = grad.to_local() if hasattr(grad, "to_local") else grad
                if poison[2] is None or poison[2] == dist.get_rank():
                    local.view(-1)[0] = float("nan")
            return loss
        opt.step(closure)
    return opt


def _dtensor_worker(rank, store, out):
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))

        def dtensors():
            return [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in make_params()]

        results = {}
        for name, kwargs in DTENSOR_CASES:
            for compile in (False, True):
                params = dtensors()
                _dtensor_run(name, kwargs, params, compile)
                results[name, compile] = [p.full_tensor().detach() for p in params]
        for name, kwargs in (DTENSOR_CASES[0], CASES[0]):
            params = dtensors()
            opt = _dtensor_run(name, kwargs, params, False, poison=(2, 0, 1))
            results[name, "nan"] = ([p.full_tensor().detach() for p in params], opt.skipped_steps)
        params = dtensors()
        before = [p.full_tensor().detach() for p in params]
        opt = steepest.TAM(params, lr=0.05)
        _loss(list(enumerate(params))).backward()
        try:
            opt.step()
            results["refused"] = None
        except TypeError as err:
            unchanged = all(torch.equal(a, p.full_tensor()) for a, p in zip(before, params)) and not opt.state
            results["refused"] = (str(err), unchanged)
        params = dtensors()
        _loss(list(enumerate(params))).backward()
        try:
            steepest.Prodigy(params, slice_p=2).step()
            results["slice_refused"] = None
        except TypeError as err:
            results["slice_refused"] = str(err)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_dtensor_params_of_fsdp2_step_as_whole_tensors(tmp_path):
    """DTensor params sharded over two processes (as FSDP2 and tensor parallelism hold them): elementwise methods,
    Muon and the global-step methods take the whole tensors' steps exactly, eager and with compile=True (such params
    step eager: the flat kernels aliased their memory and the process crashed); a NaN in one process's shard skips the
    step on both (skip_nonfinite), as on the whole tensors; a method that reduces over whole tensors (TAM) refuses
    them naming the param's type, before anything changes, and so does Prodigy's slice_p (a strided flat view).
    The shapes shard unevenly (5 rows over 2 processes, a 1-element tensor with an empty shard)."""
    mp.spawn(_dtensor_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "out.0")
    for name, kwargs in DTENSOR_CASES:
        params = make_params()
        _dtensor_run(name, kwargs, params, False)
        for compile in (False, True):
            for a, b in zip(got[name, compile], params):
                torch.testing.assert_close(a, b.detach(), rtol=1e-13, atol=1e-15, msg=f"{name} compile={compile}")
    for name, kwargs in (DTENSOR_CASES[0], CASES[0]):
        params = make_params()
        # Rank 1 holds the last rows of tensor 0 (Shard(0) gives rank 0 the first ceil(5/2) = 3): its first local
        # entry is row 3, column 0 of the whole tensor.
        first_of_rank1 = math.ceil(params[0].shape[0] / WORLD)
        opt = getattr(steepest, name)(params, compile=False, skip_nonfinite=True, **kwargs)
        for t in range(STEPS):
            def closure(t=t, opt=opt, params=params, row=first_of_rank1):
                opt.zero_grad()
                loss = _loss(list(enumerate(params)))
                loss.backward()
                if t == 2:
                    params[0].grad[row, 0] = float("nan")
                return loss
            opt.step(closure)
        tensors, skipped = got[name, "nan"]
        assert skipped == opt.skipped_steps == 1
        for a, b in zip(tensors, params):
            torch.testing.assert_close(a, b.detach(), rtol=1e-13, atol=1e-15, msg=name)
    message, unchanged = got["refused"]
    assert "DTensor" in message and "TAM" in message and unchanged
    assert "slice_p" in got["slice_refused"]


def test_fsdp_flat_params_refused_by_per_tensor_methods_and_taken_by_elementwise_ones():
    """A FullyShardedDataParallel flat param (``_fsdp_flattened``) holds pieces of several tensors: TAM's per-tensor
    cosine would span them, so TAM refuses it naming FullyShardedDataParallel, before any change; AdamW steps it."""
    params = make_params()
    for p in params:
        p._fsdp_flattened = True
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    tam = steepest.TAM(params, lr=0.1)
    with pytest.raises(TypeError, match="FullyShardedDataParallel"):
        tam.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and not tam.state
    steepest.AdamW(params, lr=0.1).step()
    assert not torch.equal(before[0], params[0])
