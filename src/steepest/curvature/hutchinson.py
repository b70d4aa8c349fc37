"""Hutchinson estimators of the trace, the diagonal and per-block traces of a curvature operator."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .eigen import _generator, _operator
from .operators import CurvatureError, CurvatureOperator

__all__ = ["Estimate", "trace", "diagonal", "block_traces"]


@dataclass
class Estimate:
    """A Monte-Carlo estimate: ``value`` (float or tensor), its standard error ``stderr``, the number of
    probes used, and whether the stopping tolerance was met."""

    value: Any
    stderr: Any
    probes: int
    converged: bool = True
    samples: Tensor | None = field(default=None, repr=False)

    def __float__(self) -> float:
        return float(self.value)


def _probes(n: int, k: int, dtype, device, gen: torch.Generator, distribution: str) -> Tensor:
    if distribution == "rademacher":
        return torch.randint(0, 2, (n, k), generator=gen, device=device).to(dtype) * 2 - 1
    if distribution == "gaussian":
        return torch.randn(n, k, generator=gen, dtype=dtype, device=device)
    raise CurvatureError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")


def _matmat(op: Any, n: int, matvec, V: Tensor) -> Tensor:
    if isinstance(op, CurvatureOperator):
        return op.matmat(V)
    if isinstance(op, Tensor):
        return op @ V
    return torch.stack([matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


def _run(op: Any, stat, tol: float, min_probes: int, max_probes: int, batch: int, seed: int,
         distribution: str, done) -> tuple[list[Tensor], bool]:
    n, dtype, device, matvec = _operator(op)
    if tol <= 0 and max_probes is None:
        raise CurvatureError("give a positive tol or a finite max_probes")
    if min_probes < 2:
        raise CurvatureError("min_probes must be >= 2 (the standard error needs two samples)")
    if max_probes < min_probes:
        raise CurvatureError(f"max_probes={max_probes} is below min_probes={min_probes}")
    gen = _generator(seed, device)
    samples: list[Tensor] = []
    while len(samples) < max_probes:
        k = min(batch, max_probes - len(samples))
        Z = _probes(n, k, dtype, device, gen, distribution)
        HZ = _matmat(op, n, matvec, Z)
        for j in range(k):
            samples.append(stat(Z[:, j], HZ[:, j]))
        if len(samples) >= min_probes and done(torch.stack(samples)):
            return samples, True
    return samples, False


def _mean_stderr(S: Tensor) -> tuple[Tensor, Tensor]:
    m = S.shape[0]
    return S.mean(0), S.std(0, unbiased=True) / math.sqrt(m)


def trace(op: Any, tol: float = 1e-2, *, min_probes: int = 10, max_probes: int = 1000, batch: int = 4,
          seed: int = 0, distribution: str = "rademacher") -> Estimate:
    """Hutchinson's trace estimator ``E[z^T A z]`` (Hutchinson 1990; as used by HAWQ-V2, Dong et al. 2019,
    arXiv 1911.03852), with Rademacher probes.

    Probes are drawn ``batch`` at a time until the standard error is ``<= tol * |estimate|`` (after at
    least ``min_probes``) or ``max_probes`` is reached (then ``converged`` is False).
    """
    def done(S):
        mean, se = _mean_stderr(S)
        return bool(se <= tol * mean.abs())

    samples, ok = _run(op, lambda z, hz: torch.dot(z, hz), tol, min_probes, max_probes, batch, seed,
                       distribution, done)
    S = torch.stack(samples).double()
    mean, se = _mean_stderr(S)
    return Estimate(float(mean), float(se), len(samples), ok, S)


def diagonal(op: Any, tol: float = 1e-1, *, min_probes: int = 10, max_probes: int = 1000, batch: int = 4,
             seed: int = 0) -> Estimate:
    """Hutchinson-style diagonal estimator ``E[z * (A z)]`` with Rademacher probes (Bekas et al. 2007;
    used by AdaHessian, Yao et al. 2020, arXiv 2006.00719).

    ``value`` and ``stderr`` are flat tensors; stops when ``||stderr|| <= tol * ||value||``.
    """
    def done(S):
        mean, se = _mean_stderr(S)
        return bool(se.norm() <= tol * mean.norm())

    samples, ok = _run(op, lambda z, hz: z * hz, tol, min_probes, max_probes, batch, seed, "rademacher", done)
    S = torch.stack(samples)
    mean, se = _mean_stderr(S)
    return Estimate(mean, se, len(samples), ok, None)


def _default_blocks(op: CurvatureOperator) -> dict[str, list[int]]:
    blocks: dict[str, list[int]] = {}
    for i, name in enumerate(op.names):
        owner = name.rsplit(".", 1)[0] if "." in name else name
        blocks.setdefault(owner, []).append(i)
    return blocks


def block_traces(op: CurvatureOperator, blocks: Mapping[str, Sequence[str]] | str | None = None, tol: float = 1e-2,
                 *, min_probes: int = 10, max_probes: int = 1000, batch: int = 4, seed: int = 0
                 ) -> dict[str, Estimate]:
    """Per-block (per-layer) Hessian traces as in HAWQ-V2 (Dong et al. 2019, arXiv 1911.03852).

    One probe ``z`` gives every block's sample ``z_b^T (A z)_b``, unbiased for ``tr(A_bb)``. ``blocks``:
    None or "module" (parameters grouped by their owning module), "parameter" (one block per
    parameter), or a mapping ``block name -> parameter names``. Stops when every block meets ``tol``.
    """
    if not isinstance(op, CurvatureOperator):
        raise CurvatureError("block_traces needs a curvature operator (it names blocks by parameter)")
    if blocks is None or blocks == "module":
        index = _default_blocks(op)
    elif blocks == "parameter":
        index = {name: [i] for i, name in enumerate(op.names)}
    elif isinstance(blocks, Mapping):
        pos = {name: i for i, name in enumerate(op.names)}
        index = {}
        for bname, pnames in blocks.items():
            missing = [p for p in pnames if p not in pos]
            if missing:
                raise CurvatureError(f"block {bname!r}: parameters {missing} are not in the operator")
            index[bname] = [pos[p] for p in pnames]
    else:
        raise CurvatureError(f"blocks must be None, 'module', 'parameter' or a mapping, got {blocks!r}")
    names = list(index)
    seg = torch.zeros(op.shape[0], dtype=torch.long, device=op.device)
    for b, idxs in enumerate(index.values()):
        for i in idxs:
            seg[op.offsets[i]:op.offsets[i + 1]] = b
    nb = len(names)

    def stat(z, hz):
        return torch.zeros(nb, dtype=z.dtype, device=z.device).index_add_(0, seg, z * hz)

    def done(S):
        mean, se = _mean_stderr(S)
        return bool((se <= tol * mean.abs()).all())

    samples, ok = _run(op, stat, tol, min_probes, max_probes, batch, seed, "rademacher", done)
    S = torch.stack(samples).double()
    mean, se = _mean_stderr(S)
    return {name: Estimate(float(mean[b]), float(se[b]), len(samples), bool(se[b] <= tol * mean[b].abs()), S[:, b])
            for b, name in enumerate(names)}
