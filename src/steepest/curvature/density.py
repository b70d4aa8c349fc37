"""Spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan and Xiao 2019, arXiv 1901.10159)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .eigen import _generator, _operator, lanczos
from .operators import CurvatureError

__all__ = ["SpectralDensity", "spectral_density", "plot_density"]


class SpectralDensity:
    """A smoothed eigenvalue density: ``grid`` and ``density`` (integrating to ~1), with the Gauss
    quadrature ``nodes`` and ``weights`` of every probe (lists of tensors; each probe's weights sum to 1).

    Unpacks as ``grid, density = spectral_density(H)``.
    """

    def __init__(self, grid: Tensor, density: Tensor, nodes: list[Tensor], weights: list[Tensor], sigma: float,
                 n: int) -> None:
        self.grid, self.density, self.nodes, self.weights, self.sigma, self.n = grid, density, nodes, weights, sigma, n

    def __iter__(self):
        return iter((self.grid, self.density))

    def moment(self, p: int) -> float:
        """Estimate of ``tr(A^p) / n``: the probes' average of ``sum_j w_j theta_j^p`` (exact per probe in
        expectation for ``p < 2 * steps``)."""
        return float(torch.stack([(w * t ** p).sum() for t, w in zip(self.nodes, self.weights)]).mean())

    def moment_stderr(self, p: int) -> float:
        """Standard error of :meth:`moment` over probes."""
        s = torch.stack([(w * t ** p).sum() for t, w in zip(self.nodes, self.weights)])
        return float(s.std() / math.sqrt(len(s))) if len(s) > 1 else float("inf")

    def plot(self, path: str | None = None, ax=None, log: bool = True, title: str | None = None):
        """Plot the density (log scale by default, as in the paper); save to ``path`` when given."""
        return plot_density(self, path=path, ax=ax, log=log, title=title)


def spectral_density(op: Any, *, num_probes: int = 4, steps: int = 80, grid_size: int = 1000,
                     sigma: float | None = None, sigma_rel: float = 0.01, margin: float = 0.05,
                     seed: int = 0) -> SpectralDensity:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature (Ghorbani et al. 2019,
    arXiv 1901.10159; Lin, Saad and Yang 2016).

    Each of ``num_probes`` Rademacher probes runs ``steps`` Lanczos iterations (full reorthogonalization);
    the Ritz values ``theta_j`` with weights ``tau_j`` (squared first components of T's eigenvectors)
    form a Gauss quadrature of the spectral measure, smoothed by a Gaussian of width ``sigma``
    (default ``sigma_rel`` times the spectral range) on ``grid_size`` points.
    """
    n, dtype, device, _ = _operator(op)
    if num_probes < 1 or steps < 1:
        raise CurvatureError("num_probes and steps must be >= 1")
    gen = _generator(seed, device)
    nodes, weights = [], []
    for i in range(num_probes):
        z = torch.randint(0, 2, (n,), generator=gen, device=device).to(dtype) * 2 - 1
        res = lanczos(op, min(steps, n), z, seed=seed + i + 1, restart_on_breakdown=False, keep_basis=False)
        theta, S = res.ritz()
        nodes.append(theta)
        weights.append(S[0] ** 2)
    allnodes = torch.cat(nodes)
    lo, hi = float(allnodes.min()), float(allnodes.max())
    width = hi - lo
    if width <= 0:
        width = max(abs(hi), 1.0)
    if sigma is None:
        sigma = sigma_rel * width
    pad = margin * width + 3 * sigma
    grid = torch.linspace(lo - pad, hi + pad, grid_size, dtype=torch.float64)
    density = torch.zeros_like(grid)
    norm = 1.0 / (math.sqrt(2 * math.pi) * sigma)
    for t, w in zip(nodes, weights):
        density += (w[None, :] * norm * torch.exp(-0.5 * ((grid[:, None] - t[None, :]) / sigma) ** 2)).sum(1)
    density /= num_probes
    return SpectralDensity(grid, density, nodes, weights, sigma, n)


def plot_density(sd: SpectralDensity, path: str | None = None, ax=None, log: bool = True, title: str | None = None):
    """Plot a :class:`SpectralDensity` (Ghorbani et al. 2019 style, log-scale density)."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    dens = sd.density.clamp_min(1e-12) if log else sd.density
    ax.plot(sd.grid.numpy(), dens.numpy(), lw=1.2)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-8, float(dens.max()) * 1e-9))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or f"spectral density (SLQ, n={sd.n})")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
