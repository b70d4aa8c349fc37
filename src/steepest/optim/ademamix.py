"""AdEMAMix: Adam with a mixture of a fast and a slow gradient EMA (Pagliardini et al. 2024)."""

from __future__ import annotations

import math
from typing import Any

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register


def ademamix_update(params, grads, exp_avg_slow, exp_avg_sq, exp_avg_fast=None, *, beta1, beta2, beta3, scaled_eps,
                    fast_coef, slow_coef):
    """m1 <- b1 m1 + (1-b1) g; m2 <- b3 m2 + (1-b3) g; v <- b2 v + (1-b2) g^2;
    p <- p - (fast_coef m1 + slow_coef m2) / (sqrt(v) + scaled_eps).

    With fast_coef = lr sqrt(bc2)/bc1, slow_coef = lr alpha sqrt(bc2) and scaled_eps = eps sqrt(bc2) (``scalars``)
    this is p - lr (m1/bc1 + alpha m2) / (sqrt(v)/sqrt(bc2) + eps), without a temporary for the numerator."""
    if exp_avg_fast is not None:
        mt.lerp_(exp_avg_fast, grads, 1.0 - beta1)
        fast = exp_avg_fast
    else:  # beta1 == 0: the fast EMA is the gradient itself
        fast = grads
    mt.lerp_(exp_avg_slow, grads, 1.0 - beta3)
    mt.mul_(exp_avg_sq, beta2)
    mt.addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
    denom = mt.sqrt(exp_avg_sq)
    mt.add_scalar_(denom, scaled_eps)
    mt.addcdiv_(params, fast, denom, -fast_coef)
    mt.addcdiv_(params, exp_avg_slow, denom, -slow_coef)


def linear_warmup(step: int, end: float, start: float = 0.0, warmup: int = 1) -> float:
    """The authors' ``linear_warmup_scheduler``: start -> end linearly over ``warmup`` steps, then end."""
    if step < warmup:
        a = step / float(warmup)
        return (1.0 - a) * start + a * end
    return end


def half_life_warmup(step: int, end: float, start: float = 0.0, warmup: int = 1) -> float:
    """The authors' ``linear_hl_warmup_scheduler``: beta3 grows so that its half-life
    f(beta) = log(0.5)/log(beta + 1e-8) - 1 moves linearly from f(start) to f(end) over ``warmup`` steps."""

    def f(beta: float, eps: float = 1e-8) -> float:
        return math.log(0.5) / math.log(beta + eps) - 1

    def f_inv(t: float) -> float:
        return math.pow(0.5, 1 / (t + 1))

    if step < warmup:
        a = step / float(warmup)
        return f_inv((1.0 - a) * f(start) + a * f(end))
    return end


def _optional_steps(name: str, value: Any) -> None:
    if value is not None:
        checks.integer(1)(name, value)


_optional_steps.bad_example = 0


@register("ademamix", family="first-order",
          paper="Pagliardini, Ablin & Grangier 2024, The AdEMAMix Optimizer: Better, Faster, Older",
          arxiv="2409.03137", reference="apple/ml-ademamix pytorch/ademamix.py", state_words=3,
          example_kwargs={"lr": 1e-2, "weight_decay": 1e-2, "alpha_warmup": 4, "beta3_warmup": 4},
          search_space={"lr": ("log", 1e-4, 1e-1), "alpha": ("log", 1.0, 10.0),
                        "weight_decay": ("log", 5e-3, 1.0)})
class AdEMAMix(Optimizer):
    """AdEMAMix (Pagliardini, Ablin & Grangier 2024, "The AdEMAMix Optimizer: Better, Faster, Older",
    arXiv 2409.03137), as the authors' apple/ml-ademamix pytorch/ademamix.py::

        m1 = b1 m1 + (1-b1) g;  m2 = b3(t) m2 + (1-b3(t)) g;  v = b2 v + (1-b2) g^2
        p <- p (1 - lr wd) - lr (m1/(1-b1^t) + alpha(t) m2) / (sqrt(v)/sqrt(1-b2^t) + eps)

    m2 is not bias-corrected. With ``alpha_warmup=T`` alpha(t) = alpha t/T for t < T, then alpha; with
    ``beta3_warmup=T`` b3(t) moves from b1 to b3 over t < T linearly in the half-life
    f(b) = log(0.5)/log(b + 1e-8) - 1, i.e. b3(t) = 0.5^(1/(1 + (1-t/T) f(b1) + (t/T) f(b3))), then b3
    (the paper's T_alpha_beta3 is passing the same T to both). ``None`` (default) is no warm-up.

    Defaults (the authors'): lr 1e-3, betas (0.9, 0.999, 0.9999), alpha 2, eps 1e-8, weight_decay 0
    (decoupled and scaled by lr, as the authors' ``update += wd p; p -= lr update``).
    State: exp_avg_fast, exp_avg_slow, exp_avg_sq (3 words; 2 with beta1 = 0, where, as in the authors'
    code, the fast EMA is the gradient itself). The step count t is per parameter, as the authors'.
    """

    hyperparams = {
        "lr": checks.nonnegative,
        "betas": checks.betas(3),
        "alpha": checks.nonnegative,
        "beta3_warmup": _optional_steps,
        "alpha_warmup": _optional_steps,
        "eps": checks.positive,
        "weight_decay": checks.nonnegative,
    }
    weight_decay_mode = "decoupled"
    update = staticmethod(ademamix_update)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None, alpha_warmup=None,
                 eps=1e-8, weight_decay=0.0, *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, alpha=alpha,
                        beta3_warmup=beta3_warmup, alpha_warmup=alpha_warmup, eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)

    optional_states = {"exp_avg_fast": lambda group: group["betas"][0] != 0.0}

    def init_state(self, p, group):
        state = {"exp_avg_slow": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}
        if group["betas"][0] != 0.0:
            state["exp_avg_fast"] = self.zeros_state(p)
        return state

    def scalars(self, group, step):
        beta1, beta2, beta3 = group["betas"]
        alpha = group["alpha"]
        if group["alpha_warmup"] is not None:
            alpha = linear_warmup(step, end=alpha, start=0.0, warmup=group["alpha_warmup"])
        if group["beta3_warmup"] is not None:
            beta3 = half_life_warmup(step, end=beta3, start=beta1, warmup=group["beta3_warmup"])
        lr, bias_correction2_sqrt = self.lr(group), math.sqrt(1.0 - beta2**step)
        return dict(beta1=beta1, beta2=beta2, beta3=beta3, scaled_eps=group["eps"] * bias_correction2_sqrt,
                    fast_coef=lr * bias_correction2_sqrt / (1.0 - beta1**step),
                    slow_coef=lr * alpha * bias_correction2_sqrt)
