"""Grams: gradient descent with adaptive momentum scaling (Cao, Li & Song 2024)."""

from __future__ import annotations

import math

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register
from .adam import adam_scalars


def grams_update(params, grads, exp_avg, exp_avg_sq, *, beta1, beta2, scaled_eps, step_size):
    """m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2; p <- p - step_size sign(g) |m| / (sqrt(v) + scaled_eps).

    ``scalars`` moves the paper's sqrt(bc2) out of the denominator into step_size and scaled_eps."""
    mt.lerp_(exp_avg, grads, 1.0 - beta1)
    mt.mul_(exp_avg_sq, beta2)
    mt.addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
    # |m| / denom = |m / denom| (denom > 0), so the step length takes the denominator's buffer: eager, two new
    # lists a step (the denominator, sign(g)) instead of three.
    length = mt.sqrt(exp_avg_sq)
    mt.add_scalar_(length, scaled_eps)
    mt.rdiv_(length, exp_avg)
    mt.abs_(length)
    mt.addcmul_(params, mt.sign(grads), length, -step_size)


@register("grams", family="first-order",
          paper="Cao, Li & Song 2024, Grams: Gradient Descent with Adaptive Momentum Scaling", arxiv="2412.17107",
          reference="paper Algorithm 1; Gunale0926/Grams (eps_mode='reference')", state_words=2,
          example_kwargs={"lr": 1e-2, "weight_decay": 1e-2},
          search_space={"lr": ("log", 1e-4, 1e-1), "one_minus_beta1": ("log", 4e-3, 0.1),
                        "weight_decay": ("log", 5e-3, 1.0)})
class Grams(Optimizer):
    """Grams (Cao, Li & Song 2024, "Grams: Gradient Descent with Adaptive Momentum Scaling",
    arXiv 2412.17107): Adam's step length, the current gradient's sign. The paper's Algorithm 1::

        m_t = b1 m + (1-b1) g;  v_t = b2 v + (1-b2) g^2
        u_t = (m_t/(1-b1^t)) / (sqrt(v_t/(1-b2^t)) + eps)
        p  <- p - lr (sign(g_t) |u_t| + wd p)

    Weight decay is decoupled and scaled by lr (p *= 1 - lr wd before the step), as the paper and the
    authors' code. ``correct_bias=False`` drops both bias corrections (the authors' option).
    ``eps_mode="reference"`` places eps as the authors' code (Gunale0926/Grams, ``grams-pytorch``) does:
    p <- p - lr sqrt(1-b2^t)/(1-b1^t) sign(g) |m_t| / (sqrt(v_t) + eps), eps outside the bias correction;
    with that code's default eps=1e-6 it reproduces the package. Defaults: lr 1e-3, betas (0.9, 0.999),
    eps 1e-8 (torch's convention; the paper gives no value, the package uses 1e-6), weight_decay 0,
    eps_mode "paper". State: exp_avg, exp_avg_sq (2 words). sign(0) = 0: a coordinate with a zero
    gradient does not move (except by weight decay).
    """

    hyperparams = {
        "lr": checks.nonnegative,
        "betas": checks.betas(2),
        "eps": checks.positive,
        "weight_decay": checks.nonnegative,
        "correct_bias": checks.boolean,
        "eps_mode": checks.choice("paper", "reference"),
    }
    weight_decay_mode = "decoupled"
    update = staticmethod(grams_update)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, correct_bias=True,
                 eps_mode="paper", *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, correct_bias=correct_bias, eps_mode=eps_mode, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}

    def scalars(self, group, step):
        lr = self.lr(group)
        beta1, beta2 = group["betas"]
        bc1, bc2_sqrt = 1.0, 1.0
        if group["correct_bias"]:
            bc1, bc2_sqrt = 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)
        scalars = adam_scalars(lr, group["eps"], bc1, bc2_sqrt)
        if group["eps_mode"] == "reference":  # the authors' code adds eps after the bias correction
            scalars["scaled_eps"] = group["eps"]
        return dict(beta1=beta1, beta2=beta2, **scalars)
