"""Extreme eigenpairs of symmetric operators: Lanczos with full reorthogonalization, power iteration."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .operators import CurvatureError, CurvatureOperator

__all__ = ["lanczos", "LanczosResult", "top_eigenvalues", "power_iteration"]


def _operator(op: Any) -> tuple[int, torch.dtype, torch.device, Callable[[Tensor], Tensor]]:
    """(n, dtype, device, matvec) of a curvature operator, a dense square tensor, or any object with
    ``shape`` and ``@``."""
    if isinstance(op, CurvatureOperator):
        return op.shape[0], op.dtype, op.device, op.matvec
    if isinstance(op, Tensor):
        if op.dim() != 2 or op.shape[0] != op.shape[1]:
            raise CurvatureError(f"expected a square matrix, got shape {tuple(op.shape)}")
        return op.shape[0], op.dtype, op.device, lambda v: op @ v
    if hasattr(op, "shape") and hasattr(op, "__matmul__"):
        dtype = getattr(op, "dtype", torch.float64)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float64
        return op.shape[0], dtype, getattr(op, "device", torch.device("cpu")), lambda v: op @ v
    raise CurvatureError(f"not a linear operator: {type(op).__name__}")


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    return gen


def _random_unit(n: int, dtype, device, gen: torch.Generator) -> Tensor:
    v = torch.randn(n, generator=gen, dtype=dtype, device=device)
    return v / v.norm()


@dataclass
class LanczosResult:
    """Lanczos tridiagonalization: ``alpha`` (m,), ``beta`` (m,; beta[-1] is the residual norm) and the
    orthonormal basis ``Q`` (m, n), or None when not kept."""

    alpha: Tensor
    beta: Tensor
    Q: Tensor | None

    def tridiagonal(self) -> Tensor:
        """The m x m tridiagonal matrix T = Q A Q^T."""
        m = self.alpha.shape[0]
        T = torch.diag(self.alpha)
        if m > 1:
            off = self.beta[: m - 1]
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        return T

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending) and eigenvectors of T (columns)."""
        return torch.linalg.eigh(self.tridiagonal())


def lanczos(op: Any, steps: int, v0: Tensor | None = None, *, seed: int | None = 0, reorthogonalize: bool = True,
            restart_on_breakdown: bool = True, keep_basis: bool = True,
            check: Callable[[LanczosResult], bool] | None = None, check_every: int = 1) -> LanczosResult:
    """Lanczos tridiagonalization (Lanczos 1950) with full reorthogonalization (two Gram-Schmidt
    passes, Paige 1972 / Parlett 1998): ``steps`` products with ``op`` starting from ``v0``.

    ``check(result_so_far)`` returning True stops early. On breakdown (an invariant subspace) the run
    continues from a fresh random direction orthogonal to the basis when ``restart_on_breakdown``,
    else stops there (what quadrature wants).
    """
    n, dtype, device, matvec = _operator(op)
    steps = min(steps, n)
    if steps < 1:
        raise CurvatureError("lanczos needs at least one step")
    gen = _generator(seed, device)
    q = _random_unit(n, dtype, device, gen) if v0 is None else v0.reshape(-1).to(dtype=dtype, device=device)
    if q.shape[0] != n:
        raise CurvatureError(f"start vector has length {q.shape[0]}, the operator is {n} x {n}")
    norm = q.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise CurvatureError("start vector is zero or not finite")
    q = q / norm
    cap = min(steps + 1, 16) if keep_basis or reorthogonalize else 2
    Q = torch.zeros(cap, n, dtype=dtype, device=device)
    Q[0] = q
    alpha: list[float] = []
    beta: list[float] = []
    prev, b_prev = None, 0.0
    scale = 0.0

    def result() -> LanczosResult:
        m = len(alpha)
        return LanczosResult(torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64),
                             Q[:m] if keep_basis else None)

    keep_all = keep_basis or reorthogonalize
    for j in range(steps):
        cur = Q[j] if keep_all else Q[j % 2]
        w = matvec(cur).reshape(-1).to(dtype)
        if not torch.isfinite(w).all():
            raise CurvatureError("the operator returned non-finite values (NaN/Inf in the model or loss?)")
        a = float(torch.dot(cur, w))
        w = w - a * cur
        if prev is not None:
            w = w - b_prev * prev
        if reorthogonalize:
            B = Q[: j + 1]
            for _ in range(2):
                w = w - B.t() @ (B @ w)
        b = float(w.norm())
        alpha.append(a)
        scale = max(scale, abs(a), b)
        last = j + 1 == steps
        if not last and b <= 1e-12 * max(scale, 1e-300):  # breakdown: an invariant subspace was found
            if not restart_on_breakdown or not reorthogonalize:
                beta.append(0.0)
                break
            w = torch.randn(n, generator=gen, dtype=dtype, device=device)
            B = Q[: j + 1]
            for _ in range(2):
                w = w - B.t() @ (B @ w)
            w_norm = float(w.norm())
            beta.append(0.0)
            if w_norm == 0:
                break
            nxt = w / w_norm
        else:
            beta.append(b)
            if last:
                break
            nxt = w / b
        if keep_all:
            if j + 1 >= Q.shape[0]:
                grown = torch.zeros(min(2 * Q.shape[0], steps + 1), n, dtype=dtype, device=device)
                grown[: Q.shape[0]] = Q
                Q = grown
            Q[j + 1] = nxt
            prev, b_prev = Q[j], beta[-1]
        else:
            prev, b_prev = cur.clone(), beta[-1]
            Q[(j + 1) % 2] = nxt
        if check is not None and (j + 1) % check_every == 0 and check(result()):
            break
    return result()


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    if which == "largest":
        return torch.argsort(theta, descending=True)[:k]
    if which == "smallest":
        return torch.argsort(theta)[:k]
    return torch.argsort(theta.abs(), descending=True)[:k]


def _check_which(which: str) -> None:
    if which not in ("largest", "smallest", "magnitude"):
        raise CurvatureError(f"which must be 'largest', 'smallest' or 'magnitude', got {which!r}")


def top_eigenvalues(op: Any, k: int = 1, *, which: str = "largest", method: str = "lanczos", tol: float = 1e-6,
                    max_iter: int | None = None, v0: Tensor | None = None, seed: int | None = 0
                    ) -> tuple[Tensor, Tensor]:
    """The ``k`` extreme eigenpairs of a symmetric operator: ``(values (k,), vectors (n, k))``.

    ``method="lanczos"`` (default): Lanczos with full reorthogonalization, stopped when every wanted
    Ritz pair has residual ``<= tol * max|ritz value|``; ``method="power"``: power iteration with
    deflation, as in HAWQ (Dong et al. 2019, arXiv 1905.03696) and PyHessian (Yao et al. 2020,
    arXiv 1912.07145). ``which``: "largest" (algebraic, the sharpness), "smallest" (most negative) or
    "magnitude". Values come sorted from the most extreme. ``v0`` warm-starts the iteration.
    """
    _check_which(which)
    n, dtype, device, _ = _operator(op)
    if not 1 <= k <= n:
        raise CurvatureError(f"k must be between 1 and n={n}, got {k}")
    if method == "power":
        return power_iteration(op, k, which=which, tol=tol, max_iter=max_iter or 1000, v0=v0, seed=seed)
    if method != "lanczos":
        raise CurvatureError(f"method must be 'lanczos' or 'power', got {method!r}")
    max_iter = min(n, max_iter if max_iter is not None else max(300, 20 * k))
    state = {"converged": False}

    def check(res: LanczosResult) -> bool:
        m = res.alpha.shape[0]
        if m < k:
            return False
        theta, S = res.ritz()
        idx = _wanted(theta, k, which)
        resid = (res.beta[-1] * S[-1, idx]).abs()
        ok = bool((resid <= tol * max(float(theta.abs().max()), 1e-300)).all())
        state["converged"] = ok
        return ok

    res = lanczos(op, max_iter, v0, seed=seed, check=check, check_every=1 if n <= 400 else 5)
    theta, S = res.ritz()
    idx = _wanted(theta, k, which)
    m = res.alpha.shape[0]
    if not state["converged"] and m < n:
        resid = (res.beta[-1] * S[-1, idx]).abs()
        if not bool((resid <= tol * max(float(theta.abs().max()), 1e-300)).all()):
            warnings.warn(f"Lanczos did not reach tol={tol} in {m} steps (residuals {resid.tolist()})",
                          RuntimeWarning, stacklevel=2)
    vecs = res.Q.t() @ S[:, idx].to(dtype=dtype, device=device)
    vecs = vecs / vecs.norm(dim=0, keepdim=True)
    return theta[idx].to(dtype), vecs


def power_iteration(op: Any, k: int = 1, *, which: str = "largest", tol: float = 1e-6, max_iter: int = 1000,
                    v0: Tensor | None = None, seed: int | None = 0) -> tuple[Tensor, Tensor]:
    """Power iteration with deflation for ``k`` extreme eigenpairs (HAWQ, arXiv 1905.03696; PyHessian,
    arXiv 1912.07145), stopped when the Rayleigh quotient changes by less than ``tol`` relatively.

    "largest" / "smallest" shift the operator by the dominant eigenvalue when needed, so the iteration
    converges to the algebraic extreme. ``v0``: (n,) or (n, k) warm start.
    """
    _check_which(which)
    n, dtype, device, matvec = _operator(op)
    gen = _generator(seed, device)
    starts = None
    if v0 is not None:
        starts = v0.reshape(n, -1).to(dtype=dtype, device=device)

    def run(shift: float, found: list[Tensor], start: Tensor | None) -> tuple[float, Tensor]:
        v = start if start is not None else torch.randn(n, generator=gen, dtype=dtype, device=device)
        lam_prev = None
        lam = 0.0
        for _ in range(max_iter):
            for u in found:
                v = v - torch.dot(u, v) * u
            nrm = v.norm()
            if nrm == 0:
                v = torch.randn(n, generator=gen, dtype=dtype, device=device)
                continue
            v = v / nrm
            w = matvec(v).reshape(-1).to(dtype) - shift * v
            lam = float(torch.dot(v, w))
            v_new = w
            if lam_prev is not None and abs(lam - lam_prev) <= tol * max(abs(lam), 1e-300):
                v = v_new
                break
            lam_prev = lam
            v = v_new
        for u in found:
            v = v - torch.dot(u, v) * u
        v = v / v.norm()
        return float(torch.dot(v, matvec(v).reshape(-1).to(dtype))), v

    shift = 0.0
    vals, vecs = [], []
    if which != "magnitude":
        lam0, v_0 = run(0.0, [], None if starts is None else starts[:, 0])
        # shift by the dominant magnitude so the operator is semi-definite and the wanted end dominates
        shift = -abs(lam0) if which == "largest" else abs(lam0)
        if (lam0 >= 0) == (which == "largest"):
            vals.append(lam0)
            vecs.append(v_0)
    for i in range(len(vals), k):
        start = None if starts is None or i >= starts.shape[1] else starts[:, i]
        lam, v = run(shift, vecs, start)
        vals.append(lam)
        vecs.append(v)
    return torch.tensor(vals, dtype=dtype), torch.stack(vecs, dim=1)
