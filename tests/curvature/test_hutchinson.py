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
    # z-scores of a mean of 16 samples: ~t(15); most within 2, mean near 0
    assert (z.abs() < 2.5).float().mean() >= 0.85
    assert abs(float(z.mean())) < 3 / 40 ** 0.5 + 0.3


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
    blocks = C.block_traces(H, tol=0.0, min_probes=200, max_probes=200, batch=50)
    assert list(blocks) == ["0", "2"]
    n0 = sum(p.numel() for p in model[0].parameters())
    refs = {"0": float(torch.trace(Href[:n0, :n0])), "2": float(torch.trace(Href[n0:, n0:]))}
    for name, est in blocks.items():
        assert abs(est.value - refs[name]) < 4 * est.stderr
    per_param = C.block_traces(H, "parameter", tol=0.0, min_probes=4, max_probes=4)
    assert list(per_param) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # the last layer of a CE model has a PSD diagonal block; its trace estimate is exact enough
    est = C.trace(C.hessian(model, loss_fn, batches, params=model[2]), tol=0.01, batch=8)
    assert abs(est.value - refs["2"]) < 4 * est.stderr
