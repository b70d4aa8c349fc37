"""NAdamW: Adam with Nesterov momentum (Dozat 2016) and decoupled weight decay."""

from __future__ import annotations

import math
from typing import Any

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register


def nadamw_update(params, grads, exp_avg, exp_avg_sq, *, beta1, beta2, scaled_eps, grad_coef, momentum_coef):
    """m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2; p <- p - (grad_coef g + momentum_coef m) / (sqrt(v) + scaled_eps).

    The coefficients and eps carry sqrt(bc2) (``scalars``): the same step as dividing the root by sqrt(bc2), in one
    pass fewer."""
    mt.lerp_(exp_avg, grads, 1.0 - beta1)
    mt.mul_(exp_avg_sq, beta2)
    mt.addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
    denom = mt.sqrt(exp_avg_sq)
    mt.add_scalar_(denom, scaled_eps)
    mt.addcdiv_(params, grads, denom, -grad_coef)
    mt.addcdiv_(params, exp_avg, denom, -momentum_coef)


def _optional_nonnegative(name: str, value: Any) -> None:
    if value is not None:
        checks.nonnegative(name, value)


_optional_nonnegative.bad_example = -1.0


class _MuProducts:
    """prod_{i<=t} mu_i of torch.optim.NAdam's momentum schedule, multiplied in torch's order.

    The running product is a function of (beta1, momentum_decay, t) only, so it is computed on the host
    instead of being stored per parameter; a checkpoint every 1024 steps bounds the work of a lookup
    after a jump (e.g. a loaded state_dict) while keeping the exact sequence of multiplications.
    """

    EVERY = 1024

    def __init__(self) -> None:
        self._cache: dict[tuple[float, float], tuple[list[float], int, float]] = {}

    @staticmethod
    def mu(beta1: float, psi: float, step: int) -> float:
        return beta1 * (1.0 - 0.5 * (0.96 ** (float(step) * psi)))

    def __call__(self, beta1: float, psi: float, step: int) -> float:
        key = (beta1, psi)
        marks, last_step, last = self._cache.get(key, ([1.0], 0, 1.0))
        k = min(step // self.EVERY, len(marks) - 1)
        if not k * self.EVERY <= last_step <= step:
            last_step, last = k * self.EVERY, marks[k]
        while last_step < step:
            last_step += 1
            last = last * self.mu(beta1, psi, last_step)
            if last_step % self.EVERY == 0 and last_step // self.EVERY == len(marks):
                marks.append(last)
        self._cache[key] = (marks, last_step, last)
        return last


@register("nadamw", family="first-order",
          paper="Dozat 2016, Incorporating Nesterov Momentum into Adam; AlgoPerf NAdamW baseline (Dahl et al. 2023)",
          arxiv="2306.07179", reference="mlcommons/algorithmic-efficiency prize_qualification_baselines NAdamW; "
          "torch.optim.NAdam(decoupled_weight_decay=True) for momentum_decay", state_words=2,
          example_kwargs={"lr": 1e-2, "weight_decay": 1e-2},
          search_space={"lr": ("log", 1e-4, 1e-1), "one_minus_beta1": ("log", 4e-3, 0.1),
                        "weight_decay": ("log", 5e-3, 1.0)})
class NAdamW(Optimizer):
    """NAdamW: Adam with Nesterov momentum (Dozat 2016, "Incorporating Nesterov Momentum into Adam", ICLR
    workshop) and decoupled weight decay, in the form of the AlgoPerf baseline (Dahl et al. 2023,
    "Benchmarking Neural Network Training Algorithms", arXiv 2306.07179; mlcommons/algorithmic-efficiency,
    prize_qualification_baselines; the NAdam of Table 1 of arXiv 1910.05446).

    Default (``momentum_decay=None``), the AlgoPerf update::

        m_t = b1 m + (1-b1) g;  v_t = b2 v + (1-b2) g^2
        p <- p (1 - lr wd) - lr/(1-b1^t) (b1 m_t + (1-b1) g) / (sqrt(v_t/(1-b2^t)) + eps)

    ``momentum_decay=psi`` (a number >= 0) gives instead Dozat's momentum schedule as
    torch.optim.NAdam(decoupled_weight_decay=True, momentum_decay=psi) computes it:
    mu_t = b1 (1 - 0.5 * 0.96^(t psi)), P_t = mu_1 ... mu_t, and
    p <- p (1 - lr wd) - lr [(1-mu_t)/(1-P_t) g + mu_{t+1}/(1-P_t mu_{t+1}) m_t] / (sqrt(v_t/(1-b2^t)) + eps).
    (torch's momentum_decay=0 is not the AlgoPerf form: it is the constant mu = b1/2.)

    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0 (decoupled, p *= 1 - lr wd before the
    update, as AlgoPerf and AdamW; AlgoPerf's class defaults to 1e-2, torch.optim.NAdam's to 0).
    State: exp_avg, exp_avg_sq (2 words). Differences from the reference code: AlgoPerf adds the Nesterov
    term into exp_avg and subtracts it again after the step; here exp_avg is never perturbed, so it holds
    m_t exactly. torch.optim.NAdam keeps P_t per parameter (float32 unless the default dtype is float64);
    here it is a host-side float64 product of the same factors in the same order, keyed on the step.
    """

    hyperparams = {
        "lr": checks.nonnegative,
        "betas": checks.betas(2),
        "eps": checks.positive,
        "weight_decay": checks.nonnegative,
        "momentum_decay": _optional_nonnegative,
    }
    weight_decay_mode = "decoupled"
    update = staticmethod(nadamw_update)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=None, *,
                 maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, momentum_decay=momentum_decay, maximize=maximize)
        self._mu_products = _MuProducts()
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}

    def scalars(self, group, step):
        lr = self.lr(group)
        beta1, beta2 = group["betas"]
        psi = group["momentum_decay"]
        if psi is None:
            bias_correction1 = 1.0 - beta1**step
            grad_coef = lr * (1.0 - beta1) / bias_correction1
            momentum_coef = lr * beta1 / bias_correction1
        else:
            psi = float(psi)
            mu = _MuProducts.mu(beta1, psi, step)
            mu_next = _MuProducts.mu(beta1, psi, step + 1)
            product = self._mu_products(beta1, psi, step)
            grad_coef = lr * (1.0 - mu) / (1.0 - product)
            momentum_coef = lr * mu_next / (1.0 - product * mu_next)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
        return dict(beta1=beta1, beta2=beta2, scaled_eps=group["eps"] * bias_correction2_sqrt,
                    grad_coef=grad_coef * bias_correction2_sqrt, momentum_coef=momentum_coef * bias_correction2_sqrt)
