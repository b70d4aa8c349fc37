import pytest
import torch

from steepest import curvature as C

from .models import DT, dense_hessian, make


@pytest.fixture(scope="module", params=["mlp", "transformer"])
def problem(request):
    model, loss_fn, batches, X, Y = make(request.param)
    H = C.hessian(model, loss_fn, batches)
    evals, evecs = torch.linalg.eigh(dense_hessian(model, loss_fn, X, Y))
    return H, evals, evecs


def _vec_err(v, ref):
    return float(1 - torch.abs(v @ ref))


def test_lanczos_top_and_smallest_match_eigh(problem):
    H, evals, evecs = problem
    vals, vecs = C.top_eigenvalues(H, k=3, tol=1e-8)
    ref = evals.flip(0)[:3]
    assert torch.allclose(vals, ref, rtol=1e-6, atol=0)
    assert _vec_err(vecs[:, 0], evecs[:, -1]) < 1e-6
    svals, svecs = C.top_eigenvalues(H, k=2, which="smallest", tol=1e-8)
    assert svals[0] < 0  # an indefinite Hessian: the most negative curvature
    assert torch.allclose(svals, evals[:2], rtol=1e-6, atol=0)
    assert _vec_err(svecs[:, 0], evecs[:, 0]) < 1e-6


def test_power_iteration_matches_eigh(problem):
    H, evals, _ = problem
    vals, _ = C.top_eigenvalues(H, k=1, method="power", tol=1e-10, max_iter=3000)
    assert abs(float(vals[0]) / float(evals[-1]) - 1) < 1e-6
    svals, _ = C.top_eigenvalues(H, k=1, which="smallest", method="power", tol=1e-10, max_iter=3000)
    assert abs(float(svals[0]) / float(evals[0]) - 1) < 1e-4


def test_dense_matrix_input_magnitude_and_warm_start():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=DT))
    lam = torch.linspace(-5, 3, 60, dtype=DT)
    A = Q @ torch.diag(lam) @ Q.T
    vals, vecs = C.top_eigenvalues(A, k=2, which="magnitude", tol=1e-10)
    assert torch.allclose(vals, torch.tensor([-5.0, lam[1].item()], dtype=DT), rtol=1e-8)
    vals, vecs = C.top_eigenvalues(A, k=4, tol=1e-10)
    assert torch.allclose(vals, lam.flip(0)[:4], rtol=1e-8)
    # power with deflation must not return a large negative eigenvalue as the "second largest"
    pv, _ = C.power_iteration(A, k=2, which="largest", tol=1e-12, max_iter=20000)
    assert torch.allclose(pv, lam.flip(0)[:2], rtol=1e-5)
    # a warm start from the answer converges in a few steps
    steps = []
    C.lanczos(A, 60, vecs[:, 0], check=lambda r: steps.append(r.alpha.shape[0]) or
              bool(abs(r.beta[-1] * r.ritz()[1][-1, -1]) < 1e-8))
    assert steps[-1] <= 2


def test_lanczos_handles_low_rank_breakdown():
    g = torch.Generator().manual_seed(1)
    U = torch.randn(40, 3, generator=g, dtype=DT)
    A = U @ U.T  # rank 3: the Krylov space is invariant after 3 steps from a generic start
    vals, _ = C.top_eigenvalues(A, k=5, tol=1e-10)
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    assert torch.allclose(vals, ref, rtol=1e-8, atol=1e-10)
