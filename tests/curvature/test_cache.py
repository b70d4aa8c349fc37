"""The kept forward pass and first derivative (cache_graph): same products, rebuilt when anything changed."""

import pytest
import torch
from torch import nn

from steepest import curvature as C

from .models import DT, dense_hessian, make


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _ops(model, loss_fn, data, cache_graph):
    return [C.hessian(model, loss_fn, data, cache_graph=cache_graph),
            C.ggn(model, loss_fn, data, cache_graph=cache_graph),
            C.fisher(model, loss_fn, data, cache_graph=cache_graph),
            C.fisher(model, loss_fn, data, kind="true", cache_graph=cache_graph)]


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_kept_graph_gives_the_same_products(name):
    model, loss_fn, _, X, Y = make(name)
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(n, 3, dtype=DT)
    for kept, fresh in zip(_ops(model, loss_fn, (X, Y), None), _ops(model, loss_fn, (X, Y), False)):
        for _ in range(2):
            assert _rel(kept @ V, fresh @ V) < 1e-12
            assert _rel(kept @ V[:, 0], fresh @ V[:, 0]) < 1e-12
        assert kept.num_preparations == 1 and fresh.num_preparations == 4, type(kept).__name__
        kept.clear_cache()
        kept @ V[:, 0]
        assert kept.num_preparations == 2


def test_kept_graph_is_rebuilt_when_the_model_mode_or_data_change():
    model, loss_fn, _, X, Y = make("mlp")
    X, Y = X.clone(), Y.clone()
    H = C.hessian(model, loss_fn, (X, Y))
    v = torch.randn(H.shape[0], dtype=DT)
    H @ v
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # an optimizer step in place
    assert _rel(H @ v, dense_hessian(model, loss_fn, X, Y) @ v) < 1e-10
    assert H.num_preparations == 2
    with torch.no_grad():
        X.mul_(-2.0)  # the batch changed in place
    assert _rel(H @ v, dense_hessian(model, loss_fn, X, Y) @ v) < 1e-10
    model[0].weight.data = model[0].weight.data * 0.5  # a new tensor behind the same parameter
    assert _rel(H @ v, dense_hessian(model, loss_fn, X, Y) @ v) < 1e-10
    assert H.num_preparations == 4
    H @ v
    assert H.num_preparations == 4


def test_kept_graph_with_batch_norm_follows_the_mode_and_restores_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, Y = torch.randn(10, 3, dtype=DT), torch.randn(10, 1, dtype=DT)
    before = model[1].running_mean.clone()
    H = C.hessian(model, nn.MSELoss(), (X, Y))
    v = torch.randn(H.shape[0], dtype=DT)
    h1, h2 = H @ v, H @ v
    assert torch.equal(h1, h2) and H.num_preparations == 1
    assert torch.equal(model[1].running_mean, before)
    model.eval()
    h3 = H @ v
    assert H.num_preparations == 2 and _rel(h3, h1) > 1e-3
    assert _rel(h3, C.hessian(model, nn.MSELoss(), (X, Y), cache_graph=False) @ v) < 1e-12


def test_several_batches_kept_only_when_asked_and_never_for_one_shot_iterables():
    model, loss_fn, batches, X, Y = make("mlp")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    ref = dense_hessian(model, loss_fn, X, Y) @ v
    auto = C.hessian(model, loss_fn, batches)
    kept = C.hessian(model, loss_fn, batches, cache_graph=True)

    class Loader:  # re-iterable, not a list: a DataLoader may give other tensors each pass
        def __iter__(self):
            return iter(batches)

    loader = C.hessian(model, loss_fn, Loader(), cache_graph=True)
    for op in (auto, kept, loader):
        for _ in range(3):
            assert _rel(op @ v, ref) < 1e-10
    assert auto.num_preparations == 6 and kept.num_preparations == 2 and loader.num_preparations == 6
    with pytest.raises(C.CurvatureError, match="cache_graph"):
        C.hessian(model, loss_fn, batches, cache_graph="yes")
