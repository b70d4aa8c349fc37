"""M-FAC: the inverse of a sliding-window empirical Fisher, applied exactly through m x m coefficients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core import checks
from ..core import multitensor as mt
from ..core.global_step import Bucket, GlobalStepOptimizer
from ..core.precision import is_low_precision
from ..core.registry import register


def mfac_coefficients(gram: Tensor, damp: float) -> Tensor:
    """The lower Cholesky factor C of M = m I + G G^T / damp, for a window G of m gradients (gram = G G^T).

    The paper's dynamic algorithm (Frantar et al. 2021, Algorithm 1) keeps the m x m matrix D with
    D_ij = g_i^T F_{i-1}^{-1} g_j (i <= j) and the denominators m + D_ii; these are exactly the rows of the
    LU (without pivoting) of M, i.e. D_ij = C_ii C_ji (j > i) and m + D_ii = C_ii^2, so one Cholesky
    factorisation of the symmetric positive definite M gives all O(m^2) coefficients at once.
    """
    m = gram.shape[0]
    M = gram / damp
    M.diagonal().add_(m)
    # A non-finite gradient makes M non-finite: the factor is then NaN (as any optimizer's step would be),
    # not an exception; skip_nonfinite=True keeps such gradients out of the window.
    return torch.linalg.cholesky_ex(M)[0]


def mfac_apply(window: Tensor, chol: Tensor, x: Tensor, damp: float, gx: Tensor | None = None) -> Tensor:
    """(damp I + (1/m) sum_i g_i g_i^T)^{-1} x for the rows g_i of ``window`` (m, d), by Woodbury:

        F^{-1} x = x / damp - G^T (m I + G G^T / damp)^{-1} G x / damp^2.

    ``gx`` (G x) may be given when already known.
    """
    if gx is None:
        gx = window @ x
    c = torch.cholesky_solve(gx.unsqueeze(1), chol).squeeze(1)
    return x / damp - (window.t() @ c) / (damp * damp)


def _window_rows(w: Tensor) -> Tensor:
    """The (m, numel) view of a per-parameter window buffer (real view for complex params)."""
    if w.is_complex():
        w = torch.view_as_real(w)
    return w.reshape(w.shape[0], -1)


@register("mfac", family="curvature",
          paper="Frantar, Kurtic & Alistarh 2021, M-FAC: Efficient Matrix-Free Approximations of Second-Order "
                "Information", arxiv="2107.03356",
          reference="IST-DASLab/M-FAC (optim.py, MFAC / HInvFastUpMulti); dense float64 torch.linalg.solve "
                    "transcription", state_words=1025,
          example_kwargs={"lr": 0.1, "ngrads": 8, "damp": 0.1},
          conformance_skip={"bf16_tracking": "the inverse Fisher of a window of nearly collinear gradients "
                                              "magnifies 16-bit rounding: on the conformance problem a bfloat16 "
                                              "run's steps (bfloat16 params or states) differ from the float64 or "
                                              "float32 run's by about their length"},
          search_space={"lr": ("log", 1e-3, 1.0), "damp": ("log", 1e-6, 1.0)})
class MFAC(GlobalStepOptimizer):
    """M-FAC (Frantar, Kurtic & Alistarh 2021, "M-FAC: Efficient Matrix-Free Approximations of
    Second-Order Information", NeurIPS 2021, arXiv 2107.03356), the optimizer of the authors' code
    (IST-DASLab/M-FAC, ``optim.py``).

    The empirical Fisher of the last m gradients of a param group (a ring buffer G of m rows, zeros until
    m gradients have been seen), dampened by lambda = ``damp``,

        F = lambda I + (1/m) sum_{i<=m} g_i g_i^T,

    is inverted exactly along the window by the paper's dynamic algorithm (Woodbury in m x m
    coefficients, :func:`mfac_coefficients`): F^{-1} x = x / lambda - G^T (m I + G G^T/lambda)^{-1} G x /
    lambda^2. Each step k, with g = grad (+ wd p, L2 as the authors):

        G[k mod m] <- g;   u = F^{-1} g;   v <- mu v + (1 - mu) u (if momentum > 0, else v = u);   p <- p - lr v

    The m x m Gram matrix G G^T is kept up to date (one new row and column, O(m d) per step) and factored
    once per step (O(m^3)). Defaults (the authors'): lr 1e-3, momentum 0, weight_decay 0, ngrads (m) 1024,
    damp 1e-5. State per parameter: ``window`` (m words), ``gram`` (that parameter's share of G G^T, m x m;
    absent with 16-bit states, where G G^T of the stored window is recomputed in float32 each step, O(m^2 d),
    because a 16-bit Gram matrix is not accurate enough to factor) and ``momentum_buffer`` (1 word, when
    momentum > 0); ``group["mfac_steps"]`` counts the window writes. 16-bit storage is a loose fit: along a
    window of nearly collinear gradients the inverse magnifies the window's rounding (bfloat16 steps measured
    off by about their own length from the float32 run's on a small smooth problem). A non-finite gradient
    stays in the window for m steps (use ``skip_nonfinite=True`` to keep it out).

    Differences from the authors' code: the window is per param group (the authors keep one over all
    params; with one group, the usual case, they are the same); the coefficients come from one Cholesky
    factorisation of m I + G G^T/lambda, mathematically the LU (without pivoting) the authors compute (their
    CUDA kernel / row loop), in the param's own dtype (the authors: float32); a param without a gradient in a
    step enters that window row as zero and is not moved (the authors need every gradient); no sparse
    (pruning-mask) mode and no multi-GPU window splitting; ``closure`` is supported (the authors reject it).
    """

    hyperparams = {"lr": checks.nonnegative, "momentum": checks.unit, "weight_decay": checks.nonnegative,
                   "ngrads": checks.integer(1), "damp": checks.positive}

    def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0, ngrads=1024, damp=1e-5, *,
                 maximize=False, **engine):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ngrads=ngrads, damp=damp,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)

    optional_states = {"momentum_buffer": lambda group: group["momentum"] != 0}

    def init_state(self, p, group):
        m = group["ngrads"]
        dtype = self.state_dtype_for(p)
        real = torch.empty(0, dtype=dtype).real.dtype if dtype.is_complex else dtype
        state = {"window": torch.zeros((m, *p.shape), dtype=dtype, device=p.device)}
        if not is_low_precision(dtype):
            # A 16-bit Gram matrix is not positive definite enough to factor: with 16-bit states the Gram
            # matrix of the stored window is recomputed in float32 each step instead (O(m^2 d)).
            state["gram"] = torch.zeros((m, m), dtype=real, device=p.device)
        if group["momentum"] != 0:
            state["momentum_buffer"] = self.zeros_state(p)
        return state

    def global_step(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        buckets = self.buckets(work)
        for group in {id(b.group): b.group for b in buckets}.values():
            self._group_step(group, [b for b in buckets if b.group is group])
        self.count_step(buckets)

    def _group_step(self, group: dict[str, Any], buckets: list[Bucket]) -> None:
        m, damp, decay = group["ngrads"], group["damp"], group["weight_decay"]
        lr, mu = self.lr(group), group["momentum"]
        k = group.get("mfac_steps", 0)
        slot = k % m
        # Params of the group that have a window but no gradient this step: their row is zero.
        with_grad = {id(p) for b in buckets for p in b.params}
        for p in group["params"]:
            st = self.state.get(p)
            if st and id(p) not in with_grad:
                st["window"][slot].zero_()
                if "gram" in st:
                    st["gram"][slot].zero_()
                    st["gram"][:, slot].zero_()
        items = []  # (bucket, index, flat gradient, window rows, gram)
        for b in buckets:
            for i in range(len(b.params)):
                g = b.g[i] + decay * b.p[i] if decay != 0 else b.g[i]
                rows = b.s["window"][i].reshape(m, g.numel())
                rows[slot] = g.reshape(-1)
                items.append((b, i, g.reshape(-1), rows, b.s["gram"][i] if "gram" in b.s else None))
        dtype = torch.float32
        for _, _, _, rows, _ in items:
            dtype = torch.promote_types(dtype, rows.dtype)
        gram_total, gx = None, None
        for _, _, g, rows, gr in items:
            r = rows @ g
            if gr is None:
                full = rows.to(dtype)
                full = full @ full.t()
            else:
                gr[slot] = r.to(gr.dtype)
                gr[:, slot] = r.to(gr.dtype)
                full = gr.to(dtype)
            gram_total = full if gram_total is None else gram_total + full
            gx = r.to(dtype) if gx is None else gx + r.to(dtype)
        for p in group["params"]:  # params of the group without a gradient still count in the Gram matrix
            st = self.state.get(p)
            if st and id(p) not in with_grad and gram_total is not None:
                rows = _window_rows(st["window"]).to(dtype)
                gram_total = gram_total + (st["gram"].to(dtype) if "gram" in st else rows @ rows.t())
        group["mfac_steps"] = k + 1
        if gram_total is None:
            return
        chol = mfac_coefficients(gram_total, damp)
        c = torch.cholesky_solve(gx.unsqueeze(1), chol).squeeze(1)
        for b, i, g, rows, _ in items:
            u = g / damp - (rows.t() @ c.to(rows.dtype)) / (damp * damp)
            u = u.view_as(b.p[i])
            if mu != 0:
                v = b.s["momentum_buffer"][i]
                v.mul_(mu).add_(u, alpha=1 - mu)
                u = v
            b.p[i].add_(u, alpha=mt.fit(-lr, u.dtype))
        for b in buckets:
            b.write_back()
