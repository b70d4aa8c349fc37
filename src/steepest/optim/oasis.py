"""OASIS (Jahani et al. 2021): a truncated Hutchinson diagonal preconditioner with an adaptive step size."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core import checks
from ..core import multitensor as mt
from ..core.global_step import Bucket, total
from ..core.registry import register
from .adahessian import HessianDiagonalOptimizer, ema_

__all__ = ["OASIS"]


@register("oasis", family="curvature",
          paper="Jahani, Rusakov, Shi, Richtárik, Mahoney, Takáč 2021, Doubly Adaptive Scaled Algorithm for Machine "
                "Learning Using Second-Order Information",
          arxiv="2109.05198",
          reference="NumPy transcription of the paper's Algorithm 1 in the tests (separable problems, where the "
                    "Hutchinson estimate is exact)",
          state_words=3, needs=("closure", "hvp"), status="experimental",
          example_kwargs={"lr": 0.1, "alpha": 1e-3},
          conformance_skip={
              "maximize": "the check sets gradients by hand, which carry no graph for the Hessian-vector product; "
                          "tests/optim/test_oasis.py checks maximize=True on -loss against minimizing loss",
              "complex": "the check sets gradients by hand (no graph for the Hessian-vector product), and complex "
                         "parameters are rejected: the Rademacher probes are real",
              "tiny_lr": "with adaptive=True (the default) lr is only the first step size eta_0; later steps come "
                         "from the local smoothness estimate, whatever lr is",
          },
          search_space={"lr": ("log", 1e-3, 1.0), "alpha": ("log", 1e-6, 1e-1)})
class OASIS(HessianDiagonalOptimizer):
    """OASIS (Jahani, Rusakov, Shi, Richtárik, Mahoney, Takáč 2021, "Doubly Adaptive Scaled Algorithm for Machine
    Learning Using Second-Order Information", arXiv 2109.05198), Algorithm 1, per param group (the
    group's tensors taken as one vector w).

    At step k, with the gradient g_k at w_k and a Rademacher probe z_k (one Hessian-vector product per step)::

        v_k = z_k * (H_k z_k)                                 (Hutchinson; exact when H is diagonal)
        D_0 = v_0;   D_k = beta2 D_{k-1} + (1 - beta2) v_k     ("hessian")
        Dhat_k = max(|D_k|, alpha)                            (elementwise truncation)
        eta_0 = lr;  theta_0 = +inf
        eta_k = min( sqrt(1 + theta_{k-1}) eta_{k-1},  ||w_k - w_{k-1}||_Dhat / (2 ||g_k - g_{k-1}||*_Dhat) )
        theta_k = eta_k / eta_{k-1}
        w_{k+1} = w_k - eta_k g_k / Dhat_k

    with ||x||_D^2 = sum D x^2 and ||x||*_D^2 = sum x^2 / D over the group's tensors (k >= 1). With
    ``adaptive=False`` the step is the paper's fixed-learning-rate variant, w_{k+1} = w_k - lr g_k / Dhat_k
    (there lr near 1 is a diagonal Newton step). Defaults (this library's; the paper tunes beta2 and alpha
    per problem): lr 0.1 (eta_0), beta2 0.99, alpha 1e-5, adaptive True, seed 0 (the probes' seed, as
    :class:`~steepest.optim.adahessian.AdaHessian`). eta_k and theta_k live in the param group
    (``group["eta"]``, ``group["theta"]``). State: hessian D, prev_param w_{k-1} and prev_grad g_{k-1}
    (3 words; 1 with adaptive=False).

    Usage: ``def closure(): opt.zero_grad(); loss = f(); loss.backward(create_graph=True); return loss`` and
    ``opt.step(closure)``; the step replaces each ``p.grad`` by its detached value once the product is taken.
    ``maximize=True`` negates g (D's sign does not matter: only |D| is used).

    Guards (the paper's rule is undefined there): a zero ||w_k - w_{k-1}||_Dhat or ||g_k - g_{k-1}||*_Dhat
    (no movement, or an unchanged gradient) leaves only the first bound; when both bounds are infinite (the
    first adaptive step without a usable estimate) eta_k = eta_{k-1}; eta_{k-1} = 0 (lr = 0) gives theta_k =
    +inf and keeps eta at 0. A tensor's first step (a parameter that had no gradient before) contributes nothing
    to the two norms. Bad input: no closure -> ValueError; gradients without a graph -> RuntimeError; a non-finite
    estimate -> RuntimeWarning, that D update is skipped (the whole step is skipped when a parameter has no D yet).

    No weight decay (the paper has none; add it to the loss). In adaptive mode a change of lr after the first
    step (an lr scheduler) has no effect.

    Status experimental: the adaptive rule follows Algorithm 1 and agrees with an independent third-party
    transcription (simplecryoem's JAX ``oasis_adaptive``); no authors' code was found to test against.
    Differences from the paper: in the stochastic setting the paper evaluates
    g_k - g_{k-1} on the same sample I_k (a second gradient at w_{k-1}); here g_{k-1} is the previous step's
    gradient (its own mini-batch), exact for full-batch training only. D_0 is one probe at w_0 (the paper
    takes D_0 as an input, which may average several probes). Probes come from a generator seeded per (seed,
    step, parameter index), as AdaHessian here. Param groups each run their own eta/theta (the paper has one w).
    """

    hyperparams = {"lr": checks.nonnegative, "beta2": checks.unit, "alpha": checks.positive,
                   "adaptive": checks.boolean, "seed": checks.integer(0)}
    weight_decay_mode = "custom"
    per_tensor = False
    elementwise = False
    fusable = False  # group-wide norms between two passes: always the eager path, whatever compile says
    _needs_prior_estimate = True

    def __init__(self, params, lr=0.1, beta2=0.99, alpha=1e-5, adaptive=True, seed=0, *, maximize=False, **engine):
        defaults = dict(lr=lr, beta2=beta2, alpha=alpha, adaptive=adaptive, seed=seed, maximize=maximize)
        super().__init__(params, defaults, **engine)
        self._pending: list[tuple[dict[str, Any], list[Tensor]]] | None = None

    def hessian_due(self, group, step):
        return True

    def init_state(self, p, group):
        st = {"hessian": self.zeros_state(p)}
        if group["adaptive"]:
            st.update(prev_param=self.zeros_state(p), prev_grad=self.zeros_state(p))
        return st

    def _apply_estimate(self, p, group, est):
        state = self.state[p]
        if state["step"] == 0:
            state["hessian"].copy_(est)
        else:
            ema_([state["hessian"]], [est], group["beta2"], self.stochastic_rounding)

    # -------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step; ``closure`` re-evaluates the loss and calls ``loss.backward(create_graph=True)``."""
        self._pending = []
        try:
            loss = super().step(closure)  # checks, closure, Hessian estimate; collects into _pending
            work = self._pending
        finally:
            self._pending = None
        for group, params in work:
            self._group_step(group, params)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        self._pending.append((group, params))

    def _group_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        split: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            split[(p.device, p.dtype, p.grad.dtype)].append(p)
        buckets = [Bucket(self, group, ps) for ps in split.values()]
        alpha = group["alpha"]
        dhat = [[d.abs().clamp_(min=alpha) for d in b.s["hessian"]] for b in buckets]
        if not group["adaptive"]:
            eta = self.lr(group)
        elif group.get("eta") is None:
            eta, theta = self.lr(group), math.inf
        else:
            eta_prev, theta_prev = group["eta"], group["theta"]
            num, den = [], []
            for b, dh in zip(buckets, dhat):
                for i, x in enumerate(b.params):
                    if self.state[x]["step"] == 0:
                        continue
                    num.append(((b.p[i] - b.s["prev_param"][i]).square() * dh[i]).sum())
                    den.append(((b.g[i] - b.s["prev_grad"][i]).square() / dh[i]).sum())
            num_f, den_f = total(num), total(den)
            bound1 = math.inf if math.isinf(theta_prev) else math.sqrt(1.0 + theta_prev) * eta_prev
            bound2 = 0.5 * math.sqrt(num_f / den_f) if num_f > 0 and den_f > 0 else math.inf
            eta = min(bound1, bound2)
            if not math.isfinite(eta):
                eta = eta_prev
            theta = eta / eta_prev if eta_prev > 0 else math.inf
        for b, dh in zip(buckets, dhat):
            if group["adaptive"]:
                for i in range(len(b.p)):
                    b.s["prev_param"][i].copy_(b.p[i])
                    b.s["prev_grad"][i].copy_(b.g[i])
            for p, g, d in zip(b.p, b.g, dh):
                p.addcdiv_(g, d, value=mt.fit(-eta, p.dtype))
            b.write_back()
            for x in b.params:
                self.state[x]["step"] += 1
        if group["adaptive"]:
            group["eta"], group["theta"] = eta, theta
