"""Adan: adaptive Nesterov momentum (Xie et al. 2022)."""

from __future__ import annotations

import math

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register


def adan_update(params, grads, exp_avg, exp_avg_diff, exp_avg_sq, prev_grad, *, beta1, beta2, beta3, scaled_eps,
                has_prev, step_size, step_size_diff, decay, prox_div, prox=True):
    """One Adan step, in the order of the authors' ``_multi_tensor_adan``.

    d = (g - g_prev) * has_prev (zero on the first step); m <- b1 m + (1-b1) g; diff <- b2 diff + (1-b2) d;
    n <- b3 n + (1-b3) (g + b2 d)^2; u = (m/bc1 + b2 diff/bc2) / (sqrt(n)/sqrt(bc3) + eps);
    prox: p <- (p - lr u) / (1 + lr wd); otherwise p <- p (1 - lr wd) - lr u. The step sizes and eps carry
    sqrt(bc3) (``scalars``), so the root is not divided by it (one pass fewer).
    """
    diff = mt.sub(grads, prev_grad)
    if mt.compiling() or has_prev != 1.0:  # eager, a multiplication by 1 would be a pass over memory for nothing
        mt.mul_(diff, has_prev)
    mt.lerp_(exp_avg, grads, 1.0 - beta1)
    mt.lerp_(exp_avg_diff, diff, 1.0 - beta2)
    # Eager, each temporary is written over the one before it: one new list a step.
    nesterov_grad = mt.add(grads, diff, beta2, out=diff)  # g + b2 (g - g_prev)
    mt.mul_(exp_avg_sq, beta3)
    mt.addcmul_(exp_avg_sq, nesterov_grad, nesterov_grad, 1.0 - beta3)
    denom = mt.sqrt(exp_avg_sq, out=nesterov_grad)
    mt.add_scalar_(denom, scaled_eps)
    if not prox:
        mt.mul_(params, decay)
    mt.addcdiv_(params, exp_avg, denom, -step_size)
    mt.addcdiv_(params, exp_avg_diff, denom, -step_size_diff)
    if prox:
        mt.div_(params, prox_div)
    mt.copy_(prev_grad, grads)


@register("adan", family="first-order",
          paper="Xie et al. 2022, Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models",
          arxiv="2208.06677", reference="sail-sg/Adan (adan.py); float64 NumPy transcription in the tests",
          state_words=4, example_kwargs={"lr": 1e-2, "weight_decay": 1e-2},
          search_space={"lr": ("log", 1e-4, 1e-1), "one_minus_beta1": ("log", 4e-3, 0.1),
                        "weight_decay": ("log", 5e-3, 1.0)})
class Adan(Optimizer):
    """Adan (Xie, Zhou, Li, Lin, Yan 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models", arXiv 2208.06677), as the authors' ``adan.py`` (sail-sg/Adan).

    With d_t = g_t - g_{t-1} (d_1 = 0: the first step takes g_0 = g_1, as the authors' code)::

        m_t = b1 m + (1-b1) g_t                      (exp_avg)
        v_t = b2 v + (1-b2) d_t                      (exp_avg_diff)
        n_t = b3 n + (1-b3) (g_t + b2 d_t)^2         (exp_avg_sq)
        u_t = (m_t/(1-b1^t) + b2 v_t/(1-b2^t)) / (sqrt(n_t)/sqrt(1-b3^t) + eps)
        p  <- (p - lr u_t) / (1 + lr wd)             (proximal weight decay, the default)
        p  <- p (1 - lr wd) - lr u_t                 (no_prox=True: decoupled, as AdamW)

    The betas follow the authors' code (weights of the old averages: 0.98, 0.92, 0.99), i.e. one minus
    the paper's betas (0.02, 0.08, 0.01). Bias corrections and eps (outside the square root, added
    after dividing by sqrt(1-b3^t)) are the code's; the paper's Algorithm 1 has no bias correction.
    Defaults: lr 1e-3, betas (0.98, 0.92, 0.99), eps 1e-8, weight_decay 0, no_prox False.
    State: exp_avg, exp_avg_diff, exp_avg_sq and the previous gradient (4 words; the previous gradient at the
    param's working precision whatever ``state_dtype`` says, as it is differenced against the next one).

    Differences from the authors' code: the step count is kept per parameter (theirs per group; the same
    when all parameters of a group get gradients together); ``max_grad_norm`` (their global-norm
    clipping, which also rescales ``p.grad`` in place) is left out: clip with
    ``torch.nn.utils.clip_grad_norm_`` before ``step`` instead; the moving averages are written as
    ``lerp`` (equal up to rounding to ``mul``/``add``).
    """

    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(3), "eps": checks.positive,
                   "weight_decay": checks.nonnegative, "no_prox": checks.boolean}
    weight_decay_mode = "custom"
    update = staticmethod(adan_update)

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0, no_prox=False, *,
                 maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, no_prox=no_prox, maximize=maximize)
        super().__init__(params, defaults, **engine)

    # g_{t-1} is differenced against g_t: kept at the working precision whatever state_dtype says (in bfloat16
    # the difference of nearby numbers, one of them rounded, put 28% errors into exp_avg_diff).
    exact_states = ("prev_grad",)

    def init_state(self, p, group):
        return {"exp_avg": self.zeros_state(p), "exp_avg_diff": self.zeros_state(p),
                "exp_avg_sq": self.zeros_state(p), "prev_grad": self.zeros_state(p, self.precise_dtype_for(p))}

    def scalars(self, group, step):
        beta1, beta2, beta3 = group["betas"]
        lr = self.lr(group)
        wd = group["weight_decay"]
        bias_correction3_sqrt = math.sqrt(1.0 - beta3**step)
        return dict(beta1=beta1, beta2=beta2, beta3=beta3, scaled_eps=group["eps"] * bias_correction3_sqrt,
                    has_prev=0.0 if step == 1 else 1.0,
                    step_size=lr * bias_correction3_sqrt / (1.0 - beta1**step),
                    step_size_diff=lr * beta2 * bias_correction3_sqrt / (1.0 - beta2**step),
                    decay=1.0 - lr * wd, prox_div=1.0 + lr * wd)

    def static_options(self, group):
        return {"prox": not group["no_prox"]}
