import numpy as np
import pytest
import torch
from torch import nn

from steepest import curvature as C

from .models import DT, dense_fisher, dense_ggn, dense_hessian, make

MODELS = ["mlp", "cnn", "transformer"]


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture(scope="module", params=MODELS)
def setup(request):
    model, loss_fn, batches, X, Y = make(request.param)
    return request.param, model, loss_fn, batches, X, Y


def test_hessian_products_match_dense(setup):
    name, model, loss_fn, batches, X, Y = setup
    H = C.hessian(model, loss_fn, batches)
    Href = dense_hessian(model, loss_fn, X, Y)
    n = Href.shape[0]
    assert H.shape == (n, n)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(n, generator=g, dtype=DT)
    V = torch.randn(n, 3, generator=g, dtype=DT)
    assert _rel(H @ v, Href @ v) < 1e-10
    assert _rel(H @ V, Href @ V) < 1e-10
    hv_tuple = H @ H.unflatten(v)  # parameter-shaped in, parameter-shaped out
    assert all(t.shape == p.shape for t, p in zip(hv_tuple, model.parameters()))
    assert _rel(H.flatten(hv_tuple), Href @ v) < 1e-10


def test_ggn_products_match_dense(setup):
    name, model, loss_fn, batches, X, Y = setup
    G = C.ggn(model, loss_fn, batches)
    Gref = dense_ggn(model, loss_fn, X, Y)
    V = torch.randn(G.shape[0], 4, generator=torch.Generator().manual_seed(2), dtype=DT)
    assert _rel(G @ V, Gref @ V) < 1e-10


def test_empirical_fisher_matches_dense(setup):
    name, model, loss_fn, batches, X, Y = setup
    F = C.fisher(model, loss_fn, batches, kind="empirical")
    Fref = dense_fisher(model, loss_fn, X, Y)
    V = torch.randn(F.shape[0], 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    assert _rel(F @ V, Fref @ V) < 1e-10


def test_full_dense_and_scipy_view():
    model, loss_fn, batches, X, Y = make("mlp")
    H = C.hessian(model, loss_fn, batches)
    Href = dense_hessian(model, loss_fn, X, Y)
    assert _rel(H.to_dense(), Href) < 1e-10
    L = H.to_scipy()
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    assert L.shape == H.shape
    np.testing.assert_allclose(L @ x, (Href @ torch.from_numpy(x)).numpy(), rtol=1e-10, atol=1e-13)
    from scipy.sparse.linalg import eigsh
    top = eigsh(L, k=1, which="LA", return_eigenvectors=False)[0]
    assert abs(top - float(torch.linalg.eigvalsh(Href)[-1])) < 1e-8


def test_parameter_subset_is_the_diagonal_block():
    model, loss_fn, batches, X, Y = make("mlp_mse")
    layer = model[2]
    H = C.hessian(model, loss_fn, batches, params=layer)  # one layer, as a module
    Hn = C.hessian(model, loss_fn, batches, params=["2.weight", "2.bias"])  # or by name
    Href = dense_hessian(model, loss_fn, X, Y)
    n0 = sum(p.numel() for p in model[0].parameters())
    block = Href[n0:, n0:]
    assert H.shape == block.shape
    assert _rel(H.to_dense(), block) < 1e-10
    assert _rel(Hn.to_dense(), block) < 1e-10
    G = C.ggn(model, loss_fn, batches, params=list(model[0].parameters()))
    Gref = dense_ggn(model, loss_fn, X, Y, params=list(model[0].parameters()))
    assert _rel(G.to_dense(), Gref) < 1e-10


def test_batching_weights_by_batch_size_and_accepts_a_single_pair_or_generator():
    model, loss_fn, batches, X, Y = make("mlp")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    one = C.hessian(model, loss_fn, (X, Y)) @ v
    many = C.hessian(model, loss_fn, [(X[i:i + 4], Y[i:i + 4]) for i in range(0, 13, 4)]) @ v
    gen = C.hessian(model, loss_fn, ((X[i:i + 3], Y[i:i + 3]) for i in range(0, 13, 3)))
    assert _rel(many, one) < 1e-12
    assert _rel(gen @ v, one) < 1e-12 and _rel(gen @ v, one) < 1e-12  # generators are materialized


def test_true_fisher_is_seeded_and_approaches_ggn():
    model, loss_fn, batches, X, Y = make("mlp")
    F1 = C.fisher(model, loss_fn, batches, kind="true", seed=4)
    v = torch.randn(F1.shape[0], dtype=DT)
    assert torch.equal(F1 @ v, F1 @ v)  # fixed labels per batch: a fixed matrix
    assert not torch.equal(F1 @ v, C.fisher(model, loss_fn, batches, kind="true", seed=5) @ v)
    Gref = dense_ggn(model, loss_fn, X, Y)
    Ft = C.fisher(model, loss_fn, batches, kind="true", mc_samples=4000).to_dense()
    assert _rel(Ft, Gref) < 0.05
    m2, l2, b2, X2, Y2 = make("mlp_mse")
    Ft2 = C.fisher(m2, l2, b2, kind="true", mc_samples=4000).to_dense()
    assert _rel(Ft2, dense_ggn(m2, l2, X2, Y2)) < 0.05


def test_mode_is_respected_and_buffers_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, Y = torch.randn(10, 3, dtype=DT), torch.randn(10, 1, dtype=DT)
    loss_fn = nn.MSELoss()
    before = model[1].running_mean.clone()
    H = C.hessian(model, loss_fn, (X, Y))
    v = torch.randn(H.shape[0], dtype=DT)
    h_train = H @ v
    assert torch.equal(model[1].running_mean, before) and model.training
    model.eval()
    h_eval = H @ v
    assert not model.training
    assert _rel(h_train, h_eval) > 1e-3  # batch statistics vs running statistics: different Hessians


def test_loss_and_grad():
    model, loss_fn, batches, X, Y = make("cnn")
    from .models import dense_grad
    loss, g = C.hessian(model, loss_fn, batches).loss_and_grad()
    assert abs(loss - float(loss_fn(model(X), Y))) < 1e-12
    ref = dense_grad(model, loss_fn, X, Y)
    assert _rel(g, ref) < 1e-10


def test_torch_transformer_layer_matches_finite_differences():
    # nn.TransformerEncoderLayer calls fused attention, which has no double backward: the operators run
    # the forward pass under the math kernel. Check H v against central differences of the gradient.
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True), nn.Flatten(),
                          nn.Linear(12, 2)).double()
    X, Y = torch.randn(6, 3, 4, dtype=DT), torch.randint(0, 2, (6,))
    H = C.hessian(model, nn.CrossEntropyLoss(), (X, Y))
    v = torch.randn(H.shape[0], dtype=DT)
    eps = 1e-5
    grads = []
    for s in (1, -1):
        with torch.no_grad():
            for p, d in zip(model.parameters(), H.unflatten(v)):
                p.add_(s * eps * d)
        grads.append(H.loss_and_grad()[1])
        with torch.no_grad():
            for p, d in zip(model.parameters(), H.unflatten(v)):
                p.sub_(s * eps * d)
    fd = (grads[0] - grads[1]) / (2 * eps)
    assert _rel(H @ v, fd) < 1e-7
