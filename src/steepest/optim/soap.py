"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.precision import as_real, working_copies, write_back_
from ..core.registry import register


def soap_merge_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """The authors' ``SOAP.merge_dims`` (nikhilvyas/SOAP soap.py): merge dims from the first one on while the running
    product stays <= max_precond_dim. (3, 2, 2), 10000 -> (12,);  (128, 64, 3, 3), 1000 -> (128, 576)."""
    new_shape: list[int] = []
    curr = 1
    for sh in shape:
        temp = curr * sh
        if temp > max_precond_dim:
            if curr > 1:
                new_shape.append(curr)
                curr = sh
            else:
                new_shape.append(sh)
                curr = 1
        else:
            curr = temp
    if curr > 1 or len(new_shape) == 0:
        new_shape.append(curr)
    return tuple(new_shape)


def project(x: Tensor, Q: dict[int, Tensor], back: bool = False) -> Tensor:
    """The authors' ``project`` / ``project_back``: contract every dim d that has a basis Q_d with it
    (x x_d Q_d^T forward, x x_d Q_d back); dims without one are rotated to the back unchanged."""
    for d in range(x.ndim):
        if d in Q:
            x = torch.tensordot(x, Q[d], dims=([0], [1 if back else 0]))
        else:
            x = x.permute(*range(1, x.ndim), 0)
    return x


@register("soap", family="matrix",
          paper="Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade 2024, SOAP: Improving and "
          "Stabilizing Shampoo using Adam",
          arxiv="2409.11321", reference="nikhilvyas/SOAP (soap.py); float64 NumPy transcription",
          state_words=6,
          example_kwargs={"lr": 1e-2, "precondition_frequency": 2, "eps": 1e-3, "weight_decay": 0.0},
          search_space={"lr": ("log", 3e-4, 3e-2), "one_minus_beta1": ("log", 0.01, 0.2),
                        "weight_decay": ("log", 1e-4, 1e-1)})
class SOAP(Optimizer):
    """SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321), following the
    authors' nikhilvyas/SOAP soap.py (its newest version, with the momentum kept in the eigenbasis).

    For a parameter (merged to at most ``max_precond_dim`` per dim when ``merge_dims``) with gradient G, each dim d of
    size <= max_precond_dim keeps a factor GG_d (Shampoo's L, R) and an eigenbasis Q_d (1-D params only with
    ``precondition_1d``; dims without a basis are left as they are). With s the number of updates so far:

        step 1 (s = 0): GG_d <- lerp(GG_d, G_(d) G_(d)^T, 1 - sb);  Q_d = eigh(GG_d), descending.  No update.
        then, s <- s + 1:
            G' = G x_d Q_d^T (all d);  m <- b1 m + (1-b1) G';  v <- b2 v + (1-b2) G'^2   (m, v in the eigenbasis)
            N = (m / (sqrt(v) + eps)) x_d Q_d (all d);  N <- N / RMS(N) if normalize_grads
            p <- p - lr sqrt(1-b2^s)/(1-b1^s) N    (lr alone without correct_bias);  p <- p (1 - lr wd)
            GG_d <- lerp(GG_d, G_(d) G_(d)^T, 1 - sb)
            if s % precondition_frequency == 0 (refresh): per d, order the columns of Q_d by the estimated
                eigenvalues diag(Q_d^T GG_d Q_d), descending (permuting v's dim d alike), and Q_d <- qr(GG_d Q_d).Q,
                one power-iteration step; m is rotated from the old basis to the new one.

    The first step only initialises the preconditioner (the authors: "first step is skipped so that we never use the
    current gradients in the projection"): parameters, m, v and weight decay are untouched, and the bias correction
    and the refresh schedule count from the second step on. Defaults (the authors'): lr 3e-3, betas (0.95, 0.95),
    shampoo_beta -1 (-> betas[1]), eps 1e-8, weight_decay 0.01, precondition_frequency 10, max_precond_dim 10000,
    merge_dims False, precondition_1d False, normalize_grads False, correct_bias True. Weight decay is decoupled and,
    as in the authors' code, multiplies the already-updated parameter: p <- (p - step) (1 - lr wd).

    State: m and v (2 words) and GG_d, Q_d (2 sum_d n_d^2 numbers): 6 words for a square matrix. A 16-bit
    ``state_dtype`` applies to m and v; GG_d and Q_d stay at the working precision (in bfloat16 a low-rank factor's
    rounding turns its eigenvectors: steps measured 27% of their length off the float32-state run's, against
    0.1% this way). Same-size bases
    are computed together: one batched eigh at the first step, one batched QR per refresh. Complex parameters are
    optimised as their real view; zero-size parameters are left alone.

    Recovery: a factor GG_d that holds NaN/Inf when a refresh is due is reset to zero with a RuntimeWarning and its
    basis (and v's order) is kept; an eigh that fails in the working precision is retried in float64 (as the
    authors do), and one that still fails keeps the identity basis, with a warning.

    Deliberate differences from soap.py: eigh and QR run in the working dtype (float32 for 16/32-bit params, float64
    for float64 params; the authors always cast to float32); when no refresh is due the momentum is not rotated to
    the original basis and back with the same Q (the authors do, which changes m only by round-off); params without
    a gradient are skipped as in soap.py but with their own step count; only ``data_format="channels_first"``.
    """

    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "shampoo_beta": checks.real(-1.0, 1.0,
                                                                                                    hi_open=True),
                   "eps": checks.positive, "weight_decay": checks.nonnegative,
                   "precondition_frequency": checks.integer(1), "max_precond_dim": checks.integer(1),
                   "merge_dims": checks.boolean, "precondition_1d": checks.boolean,
                   "normalize_grads": checks.boolean, "correct_bias": checks.boolean}
    weight_decay_mode = "custom"
    elementwise = False
    per_tensor = False
    fusable = False  # eigh / QR / tensordot: always the eager path
    precise_state_prefixes = ("GG_", "Q_")

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
                 normalize_grads=False, correct_bias=True, *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, shampoo_beta=shampoo_beta,
                        eps=eps, weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        max_precond_dim=max_precond_dim, merge_dims=merge_dims, precondition_1d=precondition_1d,
                        normalize_grads=normalize_grads, correct_bias=correct_bias, maximize=maximize)
        super().__init__(params, defaults, **engine)

    # ----------------------------------------------------------------------------------------------- state
    @staticmethod
    def _layout(shape: tuple[int, ...], group) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
        """The shape SOAP works on and (dim, size) of each dim that has a basis."""
        max_dim = group["max_precond_dim"]
        if len(shape) == 1:
            if not group["precondition_1d"] or shape[0] > max_dim:
                return shape, []
            return shape, [(0, shape[0])]
        work = soap_merge_shape(shape, max_dim) if group["merge_dims"] and len(shape) > 0 else shape
        return work, [(d, n) for d, n in enumerate(work) if n <= max_dim]

    def init_state(self, p, group):
        r = as_real(p)
        dtype = self.state_dtype_for(r)
        state = {"exp_avg": torch.zeros_like(r, dtype=dtype, memory_format=torch.preserve_format),
                 "exp_avg_sq": torch.zeros_like(r, dtype=dtype, memory_format=torch.preserve_format)}
        if r.numel() == 0:
            return state
        # The factors and their eigenbases at the param's working precision whatever state_dtype says (a low-rank
        # factor's eigenvectors turn with its rounding; see Shampoo's).
        matrix_dtype = self.precise_dtype_for(r)
        for d, n in self._layout(tuple(r.shape), group)[1]:
            state[f"GG_{d}"] = torch.zeros(n, n, dtype=matrix_dtype, device=p.device)
            state[f"Q_{d}"] = torch.zeros(n, n, dtype=matrix_dtype, device=p.device)
        return state

    # ------------------------------------------------------------------------------------------------ step
    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr = self.lr(group)
        beta1, beta2 = group["betas"]
        sb = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
        work, first, refresh = [], defaultdict(list), defaultdict(list)
        for p in params:
            state = self._state_of(p, group)
            state["step"] += 1
            if p.numel() == 0:
                continue
            w = self._work(p, state, group)
            work.append(w)
            s = w["step"] - 1  # the authors' count of updates
            g, st = w["grad"], w["state"]
            shape, dims = self._layout(tuple(g.shape), group)
            w["shape"], w["dims"] = shape, dims
            Q = {d: st[f"Q_{d}"] for d, _ in dims}
            if s > 0:
                gp = project(g.reshape(shape), Q).reshape(g.shape)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(beta1).add_(gp, alpha=1.0 - beta1)
                v.mul_(beta2).add_(gp.square(), alpha=1.0 - beta2)
                denom = v.sqrt().add_(group["eps"])
                step_size = lr
                if group["correct_bias"]:
                    step_size = step_size * (1.0 - beta2**s) ** 0.5 / (1.0 - beta1**s)
                norm_grad = project((m / denom).reshape(shape), Q, back=True).reshape(g.shape)
                if group["normalize_grads"]:
                    norm_grad = norm_grad / (1e-30 + torch.mean(norm_grad**2) ** 0.5)
                w["param"].add_(norm_grad, alpha=mt.fit(-step_size, norm_grad.dtype))
                if group["weight_decay"] > 0.0:
                    w["param"].add_(w["param"], alpha=mt.fit(-lr * group["weight_decay"], norm_grad.dtype))
            w["refresh"] = s > 0 and s % group["precondition_frequency"] == 0 and bool(dims)
            if w["refresh"]:  # m back to the original basis; it is rotated into the new one below
                st["exp_avg"].copy_(project(st["exp_avg"].reshape(shape), Q, back=True).reshape(g.shape))
            gm = g.reshape(shape)
            axes = list(range(gm.ndim))
            for d, n in dims:
                contract = axes[:d] + axes[d + 1:]
                GG = st[f"GG_{d}"]
                GG.lerp_(torch.tensordot(gm, gm, dims=[contract, contract]), 1.0 - sb)
                if s == 0:
                    first[(n, GG.dtype, GG.device)].append((w, d))
                elif w["refresh"]:
                    if bool(torch.isfinite(GG).all()):
                        refresh[(n, GG.dtype, GG.device)].append((w, d))
                    else:
                        warnings.warn(f"SOAP: factor GG_{d} of a parameter of shape {tuple(p.shape)} holds NaN/Inf at "
                                      f"step {w['step']}; keeping its eigenbasis and resetting the factor to zero",
                                      RuntimeWarning, stacklevel=3)
                        GG.zero_()
        for (n, _, _), items in first.items():
            self._initial_bases(items, n)
        for items in refresh.values():
            self._refresh_bases(items)
        for w in work:
            st = w["state"]
            if w["refresh"]:
                Q = {d: st[f"Q_{d}"] for d, _ in w["dims"]}
                st["exp_avg"].copy_(project(st["exp_avg"].reshape(w["shape"]), Q).reshape(st["exp_avg"].shape))
            stochastic = self.stochastic_rounding
            write_back_(w["home"], w["param"], stochastic)
            for k, v in w["home_state"].items():
                if k != "step":
                    write_back_(v, st[k], stochastic)

    def _work(self, p: Tensor, state: dict, group) -> dict[str, Any]:
        return working_copies(p, state, group["maximize"])

    @staticmethod
    def _initial_bases(items, n: int) -> None:
        """Q_d = eigenvectors of GG_d + 1e-30 I, by descending eigenvalue (the authors' get_orthogonal_matrix)."""
        mats = torch.stack([w["state"][f"GG_{d}"] for w, d in items])
        eye = torch.eye(n, dtype=mats.dtype, device=mats.device)
        try:
            Qs = torch.linalg.eigh(mats + 1e-30 * eye)[1]
        except RuntimeError:
            Qs = []
            for w, d in items:
                m = w["state"][f"GG_{d}"]
                try:
                    Qs.append(torch.linalg.eigh(m.double() + 1e-30 * eye.double())[1].to(m.dtype))
                except RuntimeError:
                    warnings.warn(f"SOAP: eigh of GG_{d} failed, also in float64; starting from the identity basis",
                                  RuntimeWarning, stacklevel=4)
                    Qs.append(torch.flip(eye, [1]))
        for (w, d), Q in zip(items, Qs):
            w["state"][f"Q_{d}"].copy_(torch.flip(Q, [-1]))

    @staticmethod
    def _refresh_bases(items) -> None:
        """The authors' get_orthogonal_matrix_QR, batched over same-size factors: sort Q's columns by estimated
        eigenvalue (permuting v alike), one power-iteration step GG Q, then QR."""
        GG = torch.stack([w["state"][f"GG_{d}"] for w, d in items])
        Q = torch.stack([w["state"][f"Q_{d}"] for w, d in items])
        power = GG @ Q  # GG (Q P) = (GG Q) P for the column permutation P: one product serves both uses
        est = (Q * power).sum(dim=-2)  # diag(Q^T GG Q)
        order = torch.argsort(est, dim=-1, descending=True)
        Qn = torch.linalg.qr(torch.gather(power, -1, order.unsqueeze(-2).expand_as(power)))[0]
        for i, (w, d) in enumerate(items):
            st = w["state"]
            v = st["exp_avg_sq"]
            vm = v.reshape(w["shape"])
            v.copy_(vm.index_select(d, order[i]).reshape(v.shape))
            st[f"Q_{d}"].copy_(Qn[i])
