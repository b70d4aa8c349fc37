import torch

from steepest import curvature as C

from .models import dense_hessian, make


def test_filter_normalized_direction():
    model, loss_fn, batches, X, Y = make("cnn")
    d = C.random_direction(model, seed=0)
    for p, t in zip(model.parameters(), d):
        if p.dim() <= 1:
            assert torch.count_nonzero(t) == 0
        else:
            pn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            tn = t.reshape(p.shape[0], -1).norm(dim=1)
            assert torch.allclose(pn, tn, rtol=1e-12)
    d2 = C.random_direction(model, seed=0, ignore_1d=False)
    assert abs(float(d2[1].norm()) - float(model.conv.bias.norm())) < 1e-12


def test_slices_are_direct_evaluations_and_restore_params():
    model, loss_fn, batches, X, Y = make("mlp")
    before = [p.detach().clone() for p in model.parameters()]
    H = C.hessian(model, loss_fn, batches)
    (u1, u2) = C.eigen_directions(H, k=2, tol=1e-10)
    lam = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y))[-1]
    h = 1e-3
    a, losses = C.loss_slice_1d(model, loss_fn, batches, u1, alphas=[-h, 0.0, h])
    assert abs(float(losses[1]) - float(loss_fn(model(X), Y))) < 1e-12
    curv = float((losses[0] - 2 * losses[1] + losses[2]) / h ** 2)  # second difference along the top axis
    assert abs(curv / float(lam) - 1) < 1e-4
    d = C.random_direction(model, seed=1)
    a, b, L = C.loss_slice_2d(model, loss_fn, batches, d, u2, alphas=torch.linspace(-1, 1, 3),
                              betas=torch.linspace(-1, 1, 4, dtype=torch.float64))
    assert L.shape == (3, 4)
    with torch.no_grad():
        for p, t, s in zip(model.parameters(), d, u2):
            p.add_(t - 1 / 3 * s)
    assert abs(float(L[2, 1]) - float(loss_fn(model(X), Y))) < 1e-12
    with torch.no_grad():
        for p, t in zip(model.parameters(), before):
            p.copy_(t)
    _, L1 = C.loss_slice_1d(model, loss_fn, batches, d, alphas=[0.0])
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), before))


def test_interpolation_between_checkpoints(tmp_path):
    model, loss_fn, batches, X, Y = make("mlp")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    other, *_ = make("mlp", seed=3)
    end = other.state_dict()
    a, losses = C.interpolate(model, loss_fn, batches, start, end, alphas=[0.0, 0.5, 1.0])
    assert abs(float(losses[0]) - float(loss_fn(model(X), Y))) < 1e-12
    assert abs(float(losses[2]) - float(loss_fn(other(X), Y))) < 1e-12
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    fig = C.plot_slice_1d(a, losses, path=str(tmp_path / "interp.png"))
    assert (tmp_path / "interp.png").exists() and fig is not None
    C.plot_slice_2d(torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 3), torch.rand(3, 3),
                    path=str(tmp_path / "surf.png"))
    assert (tmp_path / "surf.png").exists()
