"""Sharpness tracking during training and the gradient's overlap with the top Hessian subspace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .eigen import top_eigenvalues
from .operators import CurvatureError, CurvatureOperator, fisher, ggn, hessian

__all__ = ["SharpnessTracker", "gradient_overlap"]


def _make(kind: str, model, loss_fn, data, params) -> CurvatureOperator:
    if kind == "hessian":
        return hessian(model, loss_fn, data, params)
    if kind == "ggn":
        return ggn(model, loss_fn, data, params)
    if kind in ("fisher", "empirical"):
        return fisher(model, loss_fn, data, params, kind="empirical")
    raise CurvatureError(f"kind must be 'hessian', 'ggn' or 'fisher', got {kind!r}")


class SharpnessTracker:
    """Training callback recording the top eigenvalue(s) of the Hessian every ``every`` steps, as in the
    edge-of-stability study (Cohen et al. 2021, arXiv 2103.00065).

    Each measurement is a short Lanczos run warm-started from the previous top eigenvector, so it
    costs a few Hessian-vector products once the eigenvector moves slowly. Call ``tracker(step)``
    after each optimizer step (or ``tracker.measure()``); ``steps`` and ``values`` hold the history.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data: Any, *, every: int = 10, k: int = 1,
                 kind: str = "hessian", params: Any = None, tol: float = 1e-4, max_iter: int = 30,
                 on_measure: Callable[[int, Tensor], None] | None = None) -> None:
        if every < 1:
            raise CurvatureError(f"every must be >= 1, got {every}")
        self.op = _make(kind, model, loss_fn, data, params)
        self.every, self.k, self.tol, self.max_iter = every, k, tol, max_iter
        self.on_measure = on_measure
        self.steps: list[int] = []
        self.values: list[Tensor] = []
        self.products: list[int] = []
        self._v: Tensor | None = None

    def measure(self, step: int | None = None) -> Tensor:
        """Top-k eigenvalues now (warm-started); appended to the history."""
        before = self.op.num_products
        try:
            vals, vecs = top_eigenvalues(self.op, k=self.k, tol=self.tol, max_iter=self.max_iter, v0=self._v)
        finally:
            self.op.clear_cache()  # the kept graph would hold the activations' memory through training
        self._v = vecs.sum(1) if self.k > 1 else vecs[:, 0]
        self.steps.append(len(self.steps) if step is None else step)
        self.values.append(vals.detach().cpu())
        self.products.append(self.op.num_products - before)
        if self.on_measure is not None:
            self.on_measure(self.steps[-1], vals)
        return vals

    def __call__(self, step: int) -> Tensor | None:
        if step % self.every == 0:
            return self.measure(step)
        return None

    @property
    def sharpness(self) -> list[float]:
        """The top eigenvalue at each measurement."""
        return [float(v[0]) for v in self.values]


def gradient_overlap(op: CurvatureOperator, k: int = 10, *, vecs: Tensor | None = None,
                     grad: Tensor | None = None) -> float:
    """Fraction of the gradient's squared norm in the top-k Hessian eigenspace, ``||P_k g||^2 / ||g||^2``
    (Gur-Ari, Roberts and Dyer 2018, "Gradient descent happens in a tiny subspace", arXiv 1812.04754).

    ``vecs``: precomputed orthonormal eigenvectors (n, k); ``grad``: a flat gradient (default: the
    operator's average gradient over its data).
    """
    if grad is None:
        _, grad = op.loss_and_grad()
    if vecs is None:
        _, vecs = top_eigenvalues(op, k=k, tol=1e-6)
    grad = grad.reshape(-1).to(vecs.dtype)
    gn = float(grad.norm()) ** 2
    if gn == 0:
        raise CurvatureError("the gradient is zero: its overlap with any subspace is undefined")
    proj = vecs.t() @ grad
    return float(proj.norm()) ** 2 / gn
