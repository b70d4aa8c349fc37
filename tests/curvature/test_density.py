import torch

from steepest import curvature as C

from .models import dense_hessian, make


def test_quadrature_is_exact_per_probe():
    # Gauss quadrature with m nodes integrates polynomials of degree < 2m exactly: v^T A^p v
    g = torch.Generator().manual_seed(0)
    B = torch.randn(50, 50, generator=g, dtype=torch.float64)
    A = (B + B.T) / 10
    v = torch.randn(50, generator=g, dtype=torch.float64)
    res = C.lanczos(A, 8, v, restart_on_breakdown=False)
    theta, S = res.ritz()
    w = S[0] ** 2
    u = v / v.norm()
    for p in range(0, 16):
        exact = float(u @ torch.linalg.matrix_power(A, p) @ u)
        assert abs(float((w * theta ** p).sum()) - exact) <= 1e-9 * max(1.0, abs(exact))


def test_slq_moments_and_density_against_dense(tmp_path):
    model, loss_fn, batches, X, Y = make("mlp")
    H = C.hessian(model, loss_fn, batches)
    ev = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y))
    sd = C.spectral_density(H, num_probes=60, steps=12, seed=0)
    grid, density = sd  # unpacks as (grid, density)
    assert grid.shape == density.shape
    integral = float(torch.trapezoid(density, grid))
    assert abs(integral - 1) < 1e-3
    for p in (1, 2, 3, 4):
        ref = float((ev ** p).mean())
        assert abs(sd.moment(p) - ref) < 4 * sd.moment_stderr(p) + 1e-12, p
    # extreme Ritz values bracket the spectrum's ends closely
    assert abs(float(max(t.max() for t in sd.nodes)) - float(ev[-1])) < 1e-6 * float(ev.abs().max())
    # the smoothed density's mean equals the dense spectrum's mean (up to probe noise)
    mean = float(torch.trapezoid(density * grid, grid))
    assert abs(mean - float(ev.mean())) < 4 * sd.moment_stderr(1) + 1e-3 * float(ev.abs().max())
    path = tmp_path / "density.png"
    sd.plot(str(path))
    assert path.stat().st_size > 1000


def test_full_steps_recover_the_exact_spectrum():
    g = torch.Generator().manual_seed(2)
    B = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = B @ B.T / 30
    sd = C.spectral_density(A, num_probes=1, steps=30)
    ev = torch.linalg.eigvalsh(A)
    assert torch.allclose(sd.nodes[0], ev, rtol=1e-8, atol=1e-10)
