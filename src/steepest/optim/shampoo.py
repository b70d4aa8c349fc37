"""Shampoo with the distributed-Shampoo features: grafting, blocking, merged small dims, amortised inverse roots."""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from ..core import checks
from ..core.base import Optimizer
from ..core.precision import as_real, working_copies, write_back_
from ..core.registry import register

# --------------------------------------------------------------------------------------------- shapes and blocks


def merge_small_dims(shape: tuple[int, ...], threshold: int | float) -> tuple[int, ...]:
    """distributed_shampoo's ``merge_small_dims`` (target dimensionality 1): drop size-1 dims, then merge adjacent
    dims from the last one backwards while their product stays <= threshold. () -> (1,); any 0 -> (0,).

    (5, 4), 1024 -> (20,);  (768, 256), 1024 -> (768, 256);  (32, 3, 64, 64), 8192 -> (96, 4096).
    """
    if 0 in shape:
        return (0,)
    squeezed = [d for d in reversed(shape) if d != 1] or [1]
    merged = [squeezed[0]]
    for d in squeezed[1:]:
        if merged[-1] * d <= threshold:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(reversed(merged))


def preconditioned_shape(shape: tuple[int, ...], max_dim: int | float, merge_dims: bool) -> tuple[int, ...]:
    """The shape Shampoo works on: merged small dims (when ``merge_dims``), a 0-dim tensor as (1,)."""
    if merge_dims:
        return merge_small_dims(tuple(shape), max_dim)
    return tuple(shape) if len(shape) > 0 else (1,)


def block_slices(shape: tuple[int, ...], max_dim: int | float) -> list[tuple[slice, ...]]:
    """distributed_shampoo's ``multi_dim_split``: every dim cut into chunks of ``max_dim`` (the last may be shorter),
    blocks listed in row-major order of the block grid."""
    if isinstance(max_dim, float):  # math.inf: no blocking
        return [tuple(slice(0, n) for n in shape)]
    per_dim = [[slice(i, min(i + max_dim, n)) for i in range(0, n, max_dim)] or [slice(0, 0)] for n in shape]
    return list(itertools.product(*per_dim))


def _block_shape(sl: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in sl)


def inverse_exponent(override: Any, order: int) -> float:
    """The exponent e of the inverse root A^{-e} applied to each factor of an order-``order`` block:
    1/(2 order) by default (distributed_shampoo), else the override (a float for every order, or {order: float})."""
    default = 1.0 / (2 * max(order, 1))
    if override is None:
        return default
    if isinstance(override, dict):
        return float(override.get(order, default))
    return float(override)


# ------------------------------------------------------------------------------------------------ matrix roots


def matrix_inverse_root_eigh(A: Tensor, exponent: float, eps: float) -> Tensor:
    """A^{-exponent} of symmetric PSD matrices (..., n, n) by eigendecomposition, regularised as distributed_shampoo's
    default (``PerturbationConfig(perturb_before_computation=True)``):

        L, Q = eigh(A + eps I);  if min(L) < eps: L <- L - min(L) + eps;  X = Q diag(L^{-exponent}) Q^T

    so a singular (rank-deficient or zero) A gives eigenvalues >= eps and a finite root. Batched over leading dims.
    """
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    L, Q = torch.linalg.eigh(A + eps * eye)
    lmin = L.min(dim=-1, keepdim=True).values
    L = torch.where(lmin < eps, (L - lmin) + eps, L)
    return (Q * L.pow(-exponent).unsqueeze(-2)) @ Q.mT


def matrix_inverse_root_newton(A: Tensor, root: int, eps: float, max_iterations: int = 100,
                               tolerance: float = 1e-6) -> tuple[Tensor, bool]:
    """A^{-1/root} of one symmetric PD matrix by the coupled inverse Newton iteration (distributed_shampoo's
    ``CoupledNewtonConfig``; Guo & Higham 2006):

        A_r = A + eps I;  z = (root + 1) / (2 ||A_r||_F);  X = z^{1/root} I;  M = z A_r
        repeat while max|M - I| > tolerance (at most max_iterations):
            M' = (1 - a) I + a M  (a = -1/root);  X <- X M';  M <- M'^root M

    Returns (X, converged).
    """
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    alpha = -1.0 / root
    A_ridge = A + eps * eye
    z = (root + 1) / (2 * torch.linalg.norm(A_ridge))
    X = z ** (-alpha) * eye
    M = z * A_ridge
    error = float((M - eye).abs().max())
    iteration = 0
    while error > tolerance and iteration < max_iterations:
        iteration += 1
        M_p = M.mul(alpha).add_(eye, alpha=1 - alpha)
        X = X @ M_p
        M = torch.linalg.matrix_power(M_p, root) @ M
        error = float((M - eye).abs().max())
    return X, error <= tolerance


# ---------------------------------------------------------------------------------------------- hyperparameters


def _betas_check(name: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a tuple (beta1, beta2) with beta1 in [0, 1) and beta2 in [0, 1], "
                         f"got {value!r}")
    checks.real(0.0, 1.0, hi_open=True)(f"{name}[0]", value[0])
    checks.real(0.0, 1.0)(f"{name}[1]", value[1])


_betas_check.bad_example = (0.9, 1.5)


def _max_dim_check(name: str, value: Any) -> None:
    if isinstance(value, float) and value == math.inf:
        return
    checks.integer(1)(name, value)


_max_dim_check.bad_example = 0


def _exponent_override_check(name: str, value: Any) -> None:
    if value is None:
        return
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for order, e in items:
        if order is not None and (isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 0):
            raise ValueError(f"{name}: keys must be tensor orders (integers >= 0), got {order!r}")
        where = name if order is None else f"{name}[{order}]"
        checks.real(0.0)(where, e)


_exponent_override_check.bad_example = -1.0

_GRAFTINGS = ("adam", "adagrad", "rmsprop", "sgd", None)


@register("shampoo", family="matrix",
          paper="Gupta, Koren & Singer 2018, Shampoo: Preconditioned Stochastic Tensor Optimization; Anil et al. 2020, "
          "Scalable Second Order Optimization for Deep Learning; Shi et al. 2023, A Distributed Data-Parallel PyTorch "
          "Implementation of the Distributed Shampoo Optimizer",
          arxiv="1802.09568",
          reference="facebookresearch/optimizers (distributed_shampoo); float64 NumPy transcription",
          state_words=6,
          example_kwargs={"lr": 1e-2, "precondition_frequency": 2, "eps": 1e-3},
          search_space={"lr": ("log", 1e-4, 1e-1), "one_minus_beta1": ("log", 0.01, 0.2),
                        "weight_decay": ("log", 1e-5, 1e-1)})
class Shampoo(Optimizer):
    """Shampoo (Gupta, Koren & Singer 2018, arXiv 1802.09568) as in distributed Shampoo (Shi et al. 2023,
    arXiv 2309.06497, facebookresearch/optimizers ``DistributedShampoo``), with the scalable-Shampoo practices of
    Anil et al. 2020 (arXiv 2002.09018): layer-wise grafting, amortised inverse roots, blocking.

    Each parameter is reshaped (``merge_dims``: size-1 dims dropped, adjacent dims merged from the last while their
    product stays <= ``max_preconditioner_dim``, so a (5, 4) matrix becomes a 20-vector) and cut into blocks of at
    most ``max_preconditioner_dim`` per dim. For a block of order k with gradient G and one factor F_d (n_d x n_d) per
    dim d (G_(d): the mode-d unfolding), at step t:

        F_d <- b2 F_d + w G_(d) G_(d)^T          (w = 1 - b2, or 1 and no decay when b2 = 1: AdaGrad sums)
        every ``precondition_frequency`` steps from ``start_preconditioning_step`` on:
            R_d = (F_d / c2 + eps I)^{-e}, e = 1/(2k)   (c2 = 1 - b2^t with bias correction and b2 < 1, else 1)
        m <- b1 m + (1 - b1) g;  G_bar = m / (1 - b1^t)   (g itself when b1 = 0)
        P_shampoo = G_bar x_1 R_1 x_2 ... x_k R_k      (for a matrix: R_L G_bar R_R)
        grafting ("adam"): V <- b2g V + (1-b2g) g^2;  P_graft = G_bar / (sqrt(V / (1 - b2g^t)) + eps_g)
        P = P_graft                                   before start_preconditioning_step
        P = ||P_graft||_F / (||P_shampoo||_F + 1e-16) P_shampoo   afterwards (norms per block)
        p <- p - lr (P + wd p)                         (decoupled weight decay)

    Roots R_d start as the identity. Inverse roots use ``root_method="eigh"`` (batched ``torch.linalg.eigh`` over all
    same-size factors refreshed in a step; eigenvalues below eps are shifted as distributed_shampoo does, so rank-1 or
    zero gradients give finite roots), or ``"newton"``, the coupled inverse Newton iteration (integer roots only).
    Grafting "adam" (default), "adagrad" (V <- V + g^2, no bias correction), "rmsprop" (EMA, no bias correction),
    "sgd" (P_graft = G_bar) or None (no grafting: the raw Shampoo step, identity roots before the first refresh).
    ``inverse_exponent_override``: a float exponent for every factor, or {order: exponent}; exponent 0 leaves
    that dim unpreconditioned.

    Defaults: distributed_shampoo's README recipe for replacing AdamW, its class defaults elsewhere: lr 1e-3,
    betas (0.9, 0.999), eps 1e-12, weight_decay 0 (decoupled), max_preconditioner_dim 1024,
    precondition_frequency 100, start_preconditioning_step -1 (= precondition_frequency), use_bias_correction
    True, grafting "adam" with grafting_beta2 0.999 and grafting_eps 1e-8, root_method "eigh", merge_dims True.

    State per parameter: momentum m (1 word when b1 > 0), the grafting accumulator V (1 word), and per block the
    factors F_d and roots R_d (2 sum_d n_d^2 numbers): 6 words for a square block, less for tall or wide blocks,
    more for vectors: a 1-D block of n (a bias, or a small matrix merged into a vector) keeps 2 n^2 numbers, so on a
    transformer-shaped set (d = 256, biases included) the state is 14 words per parameter, about 5 of them the biases'
    factors; ``inverse_exponent_override={1: 0.0}`` leaves 1-D blocks unpreconditioned (their step is G_bar rescaled
    to the grafted step's norm) and brings it to about 9.6. Complex parameters are optimised as their real view
    (an extra trailing dim of 2). Zero-size parameters are left alone.

    Recovery: if a factor matrix holds NaN/Inf when its root is due, or its root computation fails or is not
    finite, a RuntimeWarning is issued, the last good root is kept, and a non-finite factor is reset to zero so that
    it re-accumulates from the next gradient. (distributed_shampoo raises on a non-finite factor and tolerates up
    to 3 consecutive failed root computations, keeping the last roots.)

    Deliberate differences from distributed_shampoo: one step counter per parameter (theirs: per group; equal when
    every parameter gets a gradient every step); no beta3, iterate averaging, momentum configs, L2/corrected weight
    decay, symmetric packing, or distributed/PT2 machinery; the bias corrections 1 - b^t are computed in double
    precision (theirs as float32 0-dim tensors); factors and roots are kept at the param's working precision
    (float32 for 16-bit params and under a 16-bit ``state_dtype``, which applies to exp_avg and graft_sq; float64
    for float64 params) where theirs default to float32; ``merge_dims=False`` keeps the original shape
    (theirs always merges); ``eps`` is their ``epsilon`` (named as torch.optim names it).
    """

    hyperparams = {"lr": checks.nonnegative, "betas": _betas_check, "eps": checks.positive,
                   "weight_decay": checks.nonnegative, "max_preconditioner_dim": _max_dim_check,
                   "precondition_frequency": checks.integer(1), "start_preconditioning_step": checks.integer(-1),
                   "use_bias_correction": checks.boolean, "grafting": checks.choice(*_GRAFTINGS),
                   "grafting_beta2": checks.unit, "grafting_eps": checks.positive,
                   "root_method": checks.choice("eigh", "newton"), "newton_max_iterations": checks.integer(1),
                   "newton_tolerance": checks.positive, "inverse_exponent_override": _exponent_override_check,
                   "merge_dims": checks.boolean}
    weight_decay_mode = "custom"
    elementwise = False
    per_tensor = False
    fusable = False  # eigendecompositions and matmuls: always the eager path
    precise_state_prefixes = ("factor_", "root_")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0, max_preconditioner_dim=1024,
                 precondition_frequency=100, start_preconditioning_step=-1, use_bias_correction=True, grafting="adam",
                 grafting_beta2=0.999, grafting_eps=1e-8, root_method="eigh", newton_max_iterations=100,
                 newton_tolerance=1e-6, inverse_exponent_override=None, merge_dims=True, *, maximize=False,
                 **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, max_preconditioner_dim=max_preconditioner_dim,
                        precondition_frequency=precondition_frequency,
                        start_preconditioning_step=start_preconditioning_step,
                        use_bias_correction=use_bias_correction, grafting=grafting, grafting_beta2=grafting_beta2,
                        grafting_eps=grafting_eps, root_method=root_method,
                        newton_max_iterations=newton_max_iterations, newton_tolerance=newton_tolerance,
                        inverse_exponent_override=inverse_exponent_override, merge_dims=merge_dims,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)

    # --------------------------------------------------------------------------------------------- validation
    def _check_hyperparams(self, group, where):
        super()._check_hyperparams(group, where)
        freq, start = group["precondition_frequency"], group["start_preconditioning_step"]
        if start != -1 and start < freq:
            raise ValueError(f"{type(self).__name__}{where}: start_preconditioning_step must be -1 (= "
                             f"precondition_frequency) or >= precondition_frequency ({freq}), got {start}")
        if group["root_method"] == "newton":
            for order in range(1, 9):
                e = inverse_exponent(group["inverse_exponent_override"], order)
                if e != 0 and abs(1 / e - round(1 / e)) > 1e-9:
                    raise ValueError(f"{type(self).__name__}{where}: root_method='newton' needs integer roots "
                                     f"1/exponent, but inverse_exponent_override gives exponent {e} for order "
                                     f"{order}; use root_method='eigh'")

    @staticmethod
    def _start(group) -> int:
        start = group["start_preconditioning_step"]
        return group["precondition_frequency"] if start == -1 else start

    # ----------------------------------------------------------------------------------------------- state
    def _layout(self, p: Tensor, group) -> list[tuple[tuple[slice, ...], list[tuple[int, int, float]]]]:
        """Per block: its slices of the preconditioned shape and (dim, size, exponent) of each preconditioned dim."""
        shape = preconditioned_shape(tuple(p.shape), group["max_preconditioner_dim"], group["merge_dims"])
        out = []
        for sl in block_slices(shape, group["max_preconditioner_dim"]):
            bshape = _block_shape(sl)
            dims = [(d, n, inverse_exponent(group["inverse_exponent_override"], len(bshape)))
                    for d, n in enumerate(bshape)]
            out.append((sl, [x for x in dims if x[2] != 0]))
        return out

    def init_state(self, p, group):
        r = as_real(p)
        dtype = self.state_dtype_for(r)
        state = {}
        if group["betas"][0] != 0:
            state["exp_avg"] = torch.zeros_like(r, dtype=dtype, memory_format=torch.preserve_format)
        if group["grafting"] in ("adam", "adagrad", "rmsprop"):
            state["graft_sq"] = torch.zeros_like(r, dtype=dtype, memory_format=torch.preserve_format)
        if r.numel() == 0:
            return state
        # Factors and roots at the param's working precision whatever state_dtype says: a factor of low rank (early
        # in training) has a root ruled by its near-null directions, where a 16-bit factor's rounding lands
        # (bfloat16 factors: roots 96-99% of their largest entry off the float32-state run's after 5 steps).
        matrix_dtype = self.precise_dtype_for(r)
        for b, (_, dims) in enumerate(self._layout(r, group)):
            for d, n, _ in dims:
                state[f"factor_{b}_{d}"] = torch.zeros(n, n, dtype=matrix_dtype, device=p.device)
                state[f"root_{b}_{d}"] = torch.eye(n, dtype=matrix_dtype, device=p.device)
        return state

    # ------------------------------------------------------------------------------------------------ step
    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr = self.lr(group)
        beta1, beta2 = group["betas"]
        start, freq = self._start(group), group["precondition_frequency"]
        grafting = group["grafting"]
        work = []
        # (size, dtype, device) -> [(work, root key, bias-corrected factor, exponent)]: one batched eigh each
        due: dict[tuple, list[tuple[dict, str, Tensor, float]]] = defaultdict(list)
        for p in params:
            state = self._state_of(p, group)
            state["step"] += 1
            t = state["step"]
            if p.numel() == 0:
                continue
            w = self._work(p, state, group)
            work.append(w)
            g = w["grad"]
            layout = self._layout(w["param"], group)
            w["layout"] = layout
            shape = preconditioned_shape(tuple(g.shape), group["max_preconditioner_dim"], group["merge_dims"])
            gm = g.reshape(shape)
            # Factor matrices: F <- b2 F + w G_(d) G_(d)^T.
            factors, outers = [], []
            for b, (sl, dims) in enumerate(layout):
                gb = gm[sl]
                others = list(range(gb.ndim))
                for d, _, _ in dims:
                    contract = others[:d] + others[d + 1:]
                    factors.append(w["state"][f"factor_{b}_{d}"])
                    outers.append(torch.tensordot(gb, gb, dims=[contract, contract]))
            if factors:
                if beta2 != 1.0:
                    torch._foreach_mul_(factors, beta2)
                torch._foreach_add_(factors, outers, alpha=1.0 - beta2 if beta2 != 1.0 else 1.0)
            # Grafting accumulator.
            if grafting in ("adam", "rmsprop"):
                v = w["state"]["graft_sq"]
                b2g = group["grafting_beta2"]
                v.mul_(b2g).addcmul_(g, g, value=1.0 - b2g)
            elif grafting == "adagrad":
                w["state"]["graft_sq"].addcmul_(g, g)
            # Roots due this step.
            if (t % freq == 0 and t > start) or t == start:
                c2 = 1.0 - beta2**t if group["use_bias_correction"] and beta2 < 1.0 else 1.0
                for b, (_, dims) in enumerate(layout):
                    for d, n, e in dims:
                        key = f"factor_{b}_{d}"
                        F = w["state"][key]
                        if not bool(torch.isfinite(F).all()):
                            warnings.warn(f"Shampoo: factor matrix {key} of a parameter of shape {tuple(p.shape)} "
                                          f"holds NaN/Inf at step {t}; keeping its last inverse root and resetting "
                                          f"the factor to zero", RuntimeWarning, stacklevel=3)
                            F.zero_()
                            continue
                        due[(n, F.dtype, F.device)].append((w, f"root_{b}_{d}", F / c2, e))
        if due:
            self._refresh_roots(due, group)
        for item in work:
            self._apply(item, group, lr, beta1, start)

    def _work(self, p: Tensor, state: dict, group) -> dict[str, Any]:
        """Working copies (float32 for 16-bit storage) of param, grad (negated under maximize) and state."""
        return {"p": p, **working_copies(p, state, group["maximize"])}

    def _refresh_roots(self, due, group) -> None:
        """Inverse roots of every factor due this step, batched by size (one batched eigh per size)."""
        eps = group["eps"]
        for items in due.values():
            if group["root_method"] == "eigh":
                by_exp: dict[float, list] = defaultdict(list)
                for item in items:
                    by_exp[item[3]].append(item)
                for e, batch in by_exp.items():
                    A = torch.stack([a for _, _, a, _ in batch])
                    try:
                        roots = matrix_inverse_root_eigh(A, e, eps)
                    except RuntimeError:  # one matrix failed: retry one at a time, in float64
                        roots = [self._one_root_eigh(a, e, eps) for _, _, a, _ in batch]
                    for (w, key, _, _), X in zip(batch, roots):
                        self._store_root(w, key, X)
            else:
                for w, key, a, e in items:
                    X, ok = matrix_inverse_root_newton(a, round(1 / e), eps, group["newton_max_iterations"],
                                                       group["newton_tolerance"])
                    if not ok:
                        warnings.warn(f"Shampoo: coupled Newton did not reach newton_tolerance for {key} in "
                                      f"{group['newton_max_iterations']} iterations", RuntimeWarning, stacklevel=4)
                    self._store_root(w, key, X)

    @staticmethod
    def _one_root_eigh(a: Tensor, e: float, eps: float) -> Tensor | None:
        try:
            return matrix_inverse_root_eigh(a.double(), e, eps).to(a.dtype)
        except RuntimeError:
            return None

    @staticmethod
    def _store_root(w, key: str, X: Tensor | None) -> None:
        if X is None or not bool(torch.isfinite(X).all()):
            warnings.warn(f"Shampoo: the inverse root {key} failed or is not finite at step {w['step']}; keeping the "
                          f"last good root", RuntimeWarning, stacklevel=4)
            return
        w["state"][key].copy_(X)

    def _apply(self, w, group, lr: float, beta1: float, start: int) -> None:
        t, g, p, st = w["step"], w["grad"], w["param"], w["state"]
        grafting = group["grafting"]
        if beta1 != 0:
            m = st["exp_avg"]
            m.lerp_(g, 1.0 - beta1)
            gbar = m / (1.0 - beta1**t) if group["use_bias_correction"] else m
        else:
            gbar = g
        if grafting in ("adam", "adagrad", "rmsprop"):
            c2 = 1.0 - group["grafting_beta2"]**t if grafting == "adam" else 1.0
            denom = (st["graft_sq"] / c2).sqrt_().add_(group["grafting_eps"])
            pgraft = gbar / denom
        else:
            pgraft = gbar
        shape = preconditioned_shape(tuple(g.shape), group["max_preconditioner_dim"], group["merge_dims"])
        if t < start and grafting is not None:
            direction = pgraft.clone()
        else:
            gm, pg = gbar.reshape(shape), pgraft.reshape(shape)
            out = torch.empty(shape, dtype=g.dtype, device=g.device)
            for b, (sl, dims) in enumerate(w["layout"]):
                roots = {d: st[f"root_{b}_{d}"] for d, _, _ in dims}
                ps = _precondition(gm[sl], roots)
                if grafting is not None:
                    ps = ps * (torch.linalg.vector_norm(pg[sl]) / (torch.linalg.vector_norm(ps) + 1e-16))
                out[sl] = ps
            direction = out.reshape(g.shape)
        if group["weight_decay"] != 0:
            direction.add_(p, alpha=group["weight_decay"])
        direction.mul_(-lr)
        p.add_(direction)
        stochastic = self.stochastic_rounding
        write_back_(w["home"], p, stochastic)
        for k, v in w["home_state"].items():
            if k != "step":
                write_back_(v, st[k], stochastic)


def _precondition(g: Tensor, roots: dict[int, Tensor]) -> Tensor:
    """g x_1 R_1 ... x_k R_k: each dim contracted with its (symmetric) root, or rotated to the back if it has none."""
    if g.ndim == 2 and len(roots) == 2:
        return roots[0] @ g @ roots[1]
    for d in range(g.ndim):
        g = torch.tensordot(g, roots[d], dims=([0], [0])) if d in roots else g.permute(*range(1, g.ndim), 0)
    return g
