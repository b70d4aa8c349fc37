"""Adam, AdamW and AMSGrad."""

from __future__ import annotations

import math

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register


def adam_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, beta1, beta2, scaled_eps, step_size,
                amsgrad=False):
    """m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2; p <- p - step_size * m / (sqrt(v) + scaled_eps).

    With step_size = lr sqrt(bc2)/bc1 and scaled_eps = eps sqrt(bc2) this is p - lr/bc1 m / (sqrt(v)/sqrt(bc2) + eps)
    (``adam_scalars``) in one pass fewer than dividing the root by sqrt(bc2).
    """
    mt.lerp_(exp_avg, grads, 1.0 - beta1)
    mt.mul_(exp_avg_sq, beta2)
    mt.addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
    if amsgrad:
        mt.maximum_(max_exp_avg_sq, exp_avg_sq)
        denom = mt.sqrt(max_exp_avg_sq)
    else:
        denom = mt.sqrt(exp_avg_sq)
    mt.add_scalar_(denom, scaled_eps)
    mt.addcdiv_(params, exp_avg, denom, -step_size)


def adam_scalars(lr: float, eps: float, bias_correction1: float, bias_correction2_sqrt: float) -> dict[str, float]:
    """Adam's step size and eps with the second moment's bias correction moved out of the denominator:
    lr/bc1 m / (sqrt(v)/sqrt(bc2) + eps) = (lr sqrt(bc2)/bc1) m / (sqrt(v) + eps sqrt(bc2))."""
    return {"step_size": lr * bias_correction2_sqrt / bias_correction1, "scaled_eps": eps * bias_correction2_sqrt}


_ADAM_CHECKS = {
    "lr": checks.nonnegative,
    "betas": checks.betas(2),
    "eps": checks.positive,
    "weight_decay": checks.nonnegative,
    "amsgrad": checks.boolean,
}


class _AdamBase(Optimizer):
    hyperparams = _ADAM_CHECKS
    update = staticmethod(adam_update)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults, **engine)

    optional_states = {"max_exp_avg_sq": lambda group: group["amsgrad"]}

    def init_state(self, p, group):
        state = {"exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = self.zeros_state(p)
        return state

    def scalars(self, group, step):
        beta1, beta2 = group["betas"]
        return dict(beta1=beta1, beta2=beta2,
                    **adam_scalars(self.lr(group), group["eps"], 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)))

    def static_options(self, group):
        return {"amsgrad": group["amsgrad"]}


_ADAM_SPACE = {"lr": ("log", 1e-4, 1e-1), "one_minus_beta1": ("log", 4e-3, 0.1),
               "weight_decay": ("log", 5e-3, 1.0)}


@register("adamw", family="first-order", paper="Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization",
          arxiv="1711.05101", reference="torch.optim.AdamW", state_words=2,
          example_kwargs={"lr": 1e-2, "weight_decay": 1e-2}, search_space=_ADAM_SPACE)
class AdamW(_AdamBase):
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019, arXiv 1711.05101).

    m_t = b1 m + (1-b1) g;  v_t = b2 v + (1-b2) g^2;  p <- p (1 - lr wd) - lr/(1-b1^t) m_t / (sqrt(v_t/(1-b2^t)) + eps)

    ``amsgrad=True`` uses max(v_1..v_t) in the denominator (Reddi et al. 2018, arXiv 1904.09237); switched on
    in a group between steps, the max starts from that step's v (torch.optim's raises KeyError there).
    eps sits outside the square root and is added after dividing by sqrt(1-b2^t), as in the paper's
    Algorithm 2 and torch.optim.AdamW. Defaults: torch.optim.AdamW's, lr 1e-3, betas (0.9, 0.999), eps 1e-8,
    weight_decay 1e-2 (decoupled, scaled by lr). State: exp_avg, exp_avg_sq (2 words; 3 with amsgrad).
    """

    weight_decay_mode = "decoupled"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 *, maximize=False, **engine):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, **engine)


@register("adam", family="first-order", paper="Kingma & Ba 2015, Adam: A Method for Stochastic Optimization",
          arxiv="1412.6980", reference="torch.optim.Adam", state_words=2, example_kwargs={"lr": 1e-2},
          search_space={"lr": ("log", 1e-4, 1e-1), "one_minus_beta1": ("log", 4e-3, 0.1)})
class Adam(_AdamBase):
    """Adam (Kingma & Ba 2015, arXiv 1412.6980), with optional AMSGrad (arXiv 1904.09237).

    The update of :class:`AdamW`, with L2 weight decay: g <- g + wd p before the moments, as the paper
    and torch.optim.Adam. ``decoupled_weight_decay=True`` (torch.optim.Adam's switch, per param group) applies it
    as AdamW does instead: p *= 1 - lr wd before the update. State: exp_avg, exp_avg_sq (2 words; 3 with amsgrad).
    """

    weight_decay_mode = "l2"
    hyperparams = {**_ADAM_CHECKS, "decoupled_weight_decay": checks.boolean}
    later_defaults = {"decoupled_weight_decay": False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 *, maximize=False, decoupled_weight_decay=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay)
        Optimizer.__init__(self, params, defaults, **engine)

    def weight_decay_mode_of(self, group):
        return "decoupled" if group["decoupled_weight_decay"] else "l2"
