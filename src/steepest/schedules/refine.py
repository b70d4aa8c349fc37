"""Schedule refinement from a previous run's gradient norms (Defazio, Cutkosky, Mehta & Mishchenko 2023,
"When, Why and How Much? Adaptive Learning Rate Scheduling by Refinement", arXiv 2310.07831).

Given the gradient norms ``g_1 .. g_T`` recorded during a run, the paper's refined schedule for the next
run of the same length is

    g_hat = median_filter(g, width = tau * T)        (smoothing; the paper's Algorithm 1)
    w_t   = g_hat_t ** -power                        (power 2 for SGD with l2 norms; 1 for Adam with l1 norms)
    eta_t = w_t * sum_{p > t} w_p                    (then normalised so that max_t eta_t = 1)

With constant gradient norms this is ``eta_t = (T - 1 - t) / (T - 1)``: the linear-decay schedule, the
paper's worst-case optimum. Falling norms early in training give a warmup; rising norms at the end a fast
cooldown.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks as C
from .shapes import Tabulated

__all__ = ["refine_schedule", "median_smooth"]


def median_smooth(values: Any, width: int) -> np.ndarray:
    """Centred running median of odd ``width`` with edge values repeated at both ends, after padding the
    right end by reflection over ``2 * width`` points so that the end of the run is not flattened (the
    smoothing of Defazio et al. 2023, arXiv 2310.07831, as described in the authors' README)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    width = C.steps("width", width)
    if width % 2 == 0:
        raise ValueError(f"width must be odd so the window is centred, got {width}; pass width={width + 1}")
    if width == 1 or x.size == 0:
        return x.copy()
    pad = 2 * width
    padded = np.pad(x, (0, pad), mode="reflect") if x.size > 1 else np.repeat(x, pad + 1)
    half = width // 2
    ext = np.concatenate([np.full(half, padded[0]), padded, np.full(half, padded[-1])])
    out = np.empty(x.size)
    chunk = max(1, 4_000_000 // width)  # bound the memory of the sliding-window view
    windows = np.lib.stride_tricks.sliding_window_view(ext, width)
    for start in range(0, x.size, chunk):
        stop = min(x.size, start + chunk)
        out[start:stop] = np.median(windows[start:stop], axis=1)
    return out


def refine_schedule(grad_norms: Any, *, tau: float = 0.1, power: float = 2.0, total: int | None = None) -> Tabulated:
    """Refine a schedule from a run's gradient norms (Defazio et al. 2023, arXiv 2310.07831).

    Args:
        grad_norms: the gradient norm at each step of the previous run (positive, finite): the l2 norm for
            SGD-like methods (``power=2``), the l1 norm for Adam-like methods (``power=1``), as in the paper.
        tau: median-filter width as a fraction of the run (the authors' scripts use 0.1); 0 disables it.
        power: the weights are ``w_t = g_t ** -power``.
        total: length of the new run; the refined schedule is linearly resampled to it (default: the same
            length as ``grad_norms``).

    Returns:
        A :class:`~steepest.schedules.Tabulated` schedule of multipliers with maximum 1 and 0 at the last step;
        wrap it with ``steepest.schedules.from_schedule(optimizer, sched)``.
    """
    g = np.asarray(grad_norms, dtype=np.float64).reshape(-1) if not np.isscalar(grad_norms) else np.zeros(0)
    if g.size < 2:
        raise ValueError(f"grad_norms must hold the gradient norm of at least 2 steps, got {g.size}")
    if not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise ValueError("grad_norms must be finite and > 0; drop the steps with NaN/Inf or zero gradients first")
    tau = C.real("tau", tau, 0.0, 1.0)
    power = C.real("power", power, 0.0, lo_open=True, hint=" (2 for SGD with l2 norms, 1 for Adam with l1 norms)")
    n = g.size
    width = 2 * (int(tau * n) // 2) + 1
    smooth = median_smooth(g, width)
    w = smooth ** (-power)
    tail = np.concatenate([np.cumsum(w[::-1])[::-1][1:], [0.0]])  # sum_{p > t} w_p
    eta = w * tail
    eta = eta / eta.max()
    if total is not None:
        total = C.steps("total", total)
        if total != n:
            eta = np.interp(np.linspace(0.0, 1.0, total), np.linspace(0.0, 1.0, n), eta)
            eta = eta / eta.max()
    return Tabulated(eta)
