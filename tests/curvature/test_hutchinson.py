import torch

from steepest import curvature as C

from .models import dense_ggn, dense_hessian, make


def test_trace_within_reported_stderr_over_seeds():
    model, loss_fn, batches, X, Y = make("mlp")
    G = C.ggn(model, loss_fn, batches)
    ref = float(torch.trace(dense_ggn(model, loss_fn, X, Y)))
    z = []
    for seed in range(40):
        est = C.trace(G, tol=0.0, min_probes=16, max_probes=16, batch=16, seed=seed)
        assert est.probes == 16 and est.stderr > 0
        z.append((est.value - ref) / est.stderr)
    z = torch.tensor(z)
    # z-scores of a mean of 16 samples: ~t(15); most within 2, mean near 0, spread near 1 (an error bar too large
    # shrinks the spread, one too small widens it)
    assert (z.abs() < 2.5).float().mean() >= 0.85
    assert abs(float(z.mean())) < 3 / 40 ** 0.5 + 0.3
    assert 0.7 < float(z.std()) < 1.45


def test_trace_stopping_tolerance_and_accuracy():
    model, loss_fn, batches, X, Y = make("mlp")
    G = C.ggn(model, loss_fn, batches)
    ref = float(torch.trace(dense_ggn(model, loss_fn, X, Y)))
    est = C.trace(G, tol=0.02, batch=8)
    assert est.converged and est.stderr <= 0.02 * abs(est.value)
    assert abs(est.value - ref) < 4 * est.stderr
    capped = C.trace(G, tol=1e-9, max_probes=12, batch=4)
    assert capped.probes == 12 and not capped.converged


def test_diagonal_and_block_traces_against_dense():
    model, loss_fn, batches, X, Y = make("mlp")
    H = C.hessian(model, loss_fn, batches)
    Href = dense_hessian(model, loss_fn, X, Y)
    d = C.diagonal(H, tol=0.0, min_probes=200, max_probes=200, batch=50)
    zd = (d.value - torch.diagonal(Href)) / d.stderr.clamp_min(1e-12)
    assert (zd.abs() < 3).float().mean() > 0.95
    assert 0.7 < float(zd.std()) < 1.3  # the error bars are the errors' size, not just an upper bound
    blocks = C.block_traces(H, tol=0.0, min_probes=200, max_probes=200, batch=50)
    assert list(blocks) == ["0", "2"]
    n0 = sum(p.numel() for p in model[0].parameters())
    refs = {"0": float(torch.trace(Href[:n0, :n0])), "2": float(torch.trace(Href[n0:, n0:]))}
    for name, est in blocks.items():
        assert abs(est.value - refs[name]) < 4 * est.stderr
    per_param = C.block_traces(H, "parameter", tol=0.0, min_probes=200, max_probes=200, batch=50)
    assert list(per_param) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # each parameter's block against the dense Hessian's diagonal block at that parameter's offset
    offsets = [0]
    for p in model.parameters():
        offsets.append(offsets[-1] + p.numel())
    for (name, est), lo, hi in zip(per_param.items(), offsets, offsets[1:]):
        ref = float(torch.trace(Href[lo:hi, lo:hi]))
        assert abs(est.value - ref) < 4 * est.stderr + 1e-9 * abs(ref), name
    # the last layer of a CE model has a PSD diagonal block; its trace estimate is exact enough
    est = C.trace(C.hessian(model, loss_fn, batches, params=model[2]), tol=0.01, batch=8)
    assert abs(est.value - refs["2"]) < 4 * est.stderr


def test_estimates_are_unbiased_where_the_off_diagonal_dominates():
    """A = 1 1^T (n = 40): every diagonal entry is 1 and the trace n, while a probe's sample is all off-diagonal
    noise (z_i sum_j z_j). Signs with a nonzero mean (or any correlation between entries) bias both by about
    n (n-1) E[z]^2: the mean over 4000 probes must stay within 4 of its standard errors."""
    n = 40
    A = torch.ones(n, n, dtype=torch.float64)
    est = C.trace(A, tol=0.0, min_probes=4000, max_probes=4000, batch=500, seed=0)
    assert abs(est.value - n) < 4 * est.stderr
    d = C.diagonal(A, tol=0.0, min_probes=4000, max_probes=4000, batch=500, seed=1)
    assert float(((d.value - 1.0) / d.stderr).abs().max()) < 4.5
    assert abs(float(d.value.mean()) - 1.0) < 4 * float(d.stderr.mean()) / n**0.5
