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


def test_moments_exact_for_a_diagonal_matrix_and_error_bars_calibrated():
    """Rademacher probes give u^T D^p u = mean(d^p) exactly for a diagonal D (u = z / sqrt(n)), and Gauss
    quadrature with 10 nodes is exact for p < 20: every probe's moment is the spectrum's, with no spread. For a
    full matrix the error bar must be the error's size over seeds (z-scores with a spread near 1)."""
    d = torch.linspace(0.1, 3.0, 40, dtype=torch.float64)
    sd = C.spectral_density(torch.diag(d), num_probes=6, steps=10, seed=0)
    for p in (1, 2, 5, 9):
        assert abs(sd.moment(p) - float((d**p).mean())) <= 1e-10 * float((d**p).mean()), p
        assert sd.moment_stderr(p) <= 1e-10 * float((d**p).mean()), p
    g = torch.Generator().manual_seed(3)
    B = torch.randn(60, 60, generator=g, dtype=torch.float64)
    A = (B + B.T) / 10
    ref = float((torch.linalg.eigvalsh(A) ** 2).mean())
    runs = [C.spectral_density(A, num_probes=8, steps=6, seed=s) for s in range(40)]
    z = torch.tensor([(r.moment(2) - ref) / r.moment_stderr(2) for r in runs])
    assert abs(float(z.mean())) < 0.6 and 0.6 < float(z.std()) < 1.6
