"""diffGrad: Adam with a friction coefficient from the change of the gradient (Dubey et al. 2019)."""

from __future__ import annotations

import math

import torch

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register


def diffgrad_update(params, grads, exp_avg, exp_avg_sq, previous_grad, *, beta1, beta2, eps, step_size):
    """m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2; xi = sigmoid(|g_prev - g|); g_prev <- g;
    p <- p - step_size xi m / (sqrt(v) + eps)."""
    mt.lerp_(exp_avg, grads, 1.0 - beta1)
    mt.mul_(exp_avg_sq, beta2)
    mt.addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
    denom = mt.sqrt(exp_avg_sq)
    mt.add_scalar_(denom, eps)
    if mt.compiling():
        # xi m / d = m / ((1 + exp(-|g_prev - g|)) d): one division an element instead of two (the sigmoid's and
        # the denominator's); the fused kernel is partly bound by its arithmetic (0.94-1.0 of the two-division one).
        scaled = [(1.0 + torch.exp(-(prev - g).abs())) * d for prev, g, d in zip(previous_grad, grads, denom)]
        mt.addcdiv_(params, exp_avg, scaled, -step_size)
        mt.copy_(previous_grad, grads)
        return
    # Eager, xi m is built in g_prev's buffer (in-place kernels, no temporary), which then takes this step's g.
    friction = previous_grad
    mt.add_(friction, grads, -1.0)
    mt.abs_(friction)
    mt.sigmoid_(friction)
    mt.mul_(friction, exp_avg)
    mt.addcdiv_(params, friction, denom, -step_size)
    mt.copy_(previous_grad, grads)


@register("diffgrad", family="first-order",
          paper="Dubey et al. 2019, diffGrad: An Optimization Method for Convolutional Neural Networks",
          arxiv="1909.11015", reference="shivram1987/diffGrad diffGrad_v2.py", state_words=3,
          example_kwargs={"lr": 1e-2},
          search_space={"lr": ("log", 1e-4, 1e-1), "one_minus_beta1": ("log", 4e-3, 0.1)})
class DiffGrad(Optimizer):
    """diffGrad (Dubey, Chakraborty, Roy, Mukherjee, Singh & Chaudhuri 2019, "diffGrad: An Optimization
    Method for Convolutional Neural Networks", IEEE TNNLS, arXiv 1909.11015), as the authors'
    shivram1987/diffGrad diffGrad_v2.py::

        m_t = b1 m + (1-b1) g_t;  v_t = b2 v + (1-b2) g_t^2
        xi_t = sigmoid(|g_{t-1} - g_t|)          (g_0 = 0, so xi_1 = sigmoid(|g_1|))
        p <- p - lr sqrt(1-b2^t)/(1-b1^t) xi_t m_t / (sqrt(v_t) + eps)

    eps sits outside the bias correction, as the authors' code (and Adam's paper, Section 2 end); the
    paper writes xi m_hat / (sqrt(v_hat) + eps): this step with eps replaced by eps sqrt(1-b2^t).
    Weight decay is L2 (g <- g + wd p before everything, so g_{t-1} is stored with it), as the authors'.
    Defaults (the authors'): lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.
    State: exp_avg, exp_avg_sq, previous_grad (3 words).
    Differences from the authors' code: diffGrad_v2.py is followed (it fixes diffGrad.py, the version the
    paper ran, which kept an alias of the gradient as g_{t-1}); the authors' ``grad.add_(wd, p)`` also
    overwrites ``p.grad`` with the decayed gradient, which this does not.
    """

    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "eps": checks.positive,
                   "weight_decay": checks.nonnegative}
    weight_decay_mode = "l2"
    update = staticmethod(diffgrad_update)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, maximize=False,
                 **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p),
                "previous_grad": self.zeros_state(p)}

    def scalars(self, group, step):
        beta1, beta2 = group["betas"]
        step_size = self.lr(group) * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        return dict(beta1=beta1, beta2=beta2, eps=group["eps"], step_size=step_size)
