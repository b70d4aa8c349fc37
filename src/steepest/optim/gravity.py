"""Gravity: a kinematic, saturating step with an averaged velocity (Bahrami & Zadeh 2021)."""

from __future__ import annotations

import torch

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register


def gravity_update(params, grads, velocity, *, lr, beta_hat):
    """M = max|g| per tensor; zeta = g / (1 + (g M)^2); V <- b V + (1-b) zeta; p <- p - lr V."""
    zeta = []
    for g in grads:
        if not g.numel():
            zeta.append(g.clone())
            continue
        if mt.compiling():
            peak = g.abs().amax()
            # g / m with m = 1/max|g| is g * max|g|: the same number, and no 1/0 for a zero gradient.
            x = g * peak
            zeta.append(g / (1.0 + x * x))
            continue
        # Eager, the same numbers through one temporary: model-sized temporaries are page-faulted in afresh at every
        # step (one 38.6M tensor: 268 ms a step with five of them).
        low, high = torch.aminmax(mt.flat(g))  # a full reduction over a permuted (channels_last) g is 13x slower
        x = torch.mul(g, torch.maximum(-low, high))
        zeta.append(torch.div(g, x.mul_(x).add_(1.0), out=x))
    mt.lerp_(velocity, zeta, 1.0 - beta_hat)
    mt.add_(params, velocity, -lr)


@register("gravity", family="first-order",
          paper="Bahrami & Zadeh 2021, Gravity Optimizer: a Kinematic Approach on Optimization in Deep Learning",
          arxiv="2101.09192",
          reference="paper algorithm; dariush-bahrami/gravity.optimizer (float64 NumPy transcription in the tests)",
          state_words=1, example_kwargs={"lr": 0.1, "alpha": 0.0},
          reread_words=1,  # g: max |g| of the tensor, then zeta = g / (1 + (g max|g|)^2)
          search_space={"lr": ("log", 1e-2, 1.0), "alpha": ("log", 1e-3, 0.1)})
class Gravity(Optimizer):
    """Gravity (Bahrami & Zadeh 2021, "Gravity Optimizer: a Kinematic Approach on Optimization in Deep
    Learning", arXiv 2101.09192). Per tensor (weight matrix) W with gradient G, at update k = 1, 2, ...::

        V_0 ~ N(0, (alpha/lr)^2)                (drawn when the parameter's state is created)
        t = k - 1;  b = (beta t + 1) / (t + 2)   (b = 1/2 on the first update: Eq. 27, dW_0 = -l (V_0 + zeta_0)/2)
        m = 1 / max|G|;  zeta = G / (1 + (G/m)^2)
        V_t = b V_{t-1} + (1 - b) zeta;  W <- W - lr V_t

    ``1 + (G/m)^2`` is computed as ``1 + (G max|G|)^2`` (the same number; a zero gradient gives zeta = 0
    instead of 0/inf). The step count t starts at 0 as the authors' Keras implementation (which ran the
    paper's experiments) and the paper's Eq. 27; their later PyTorch port counts from 1 (b = (beta+1)/3
    on the first update). The standard deviation of V_0 uses the lr at the parameter's first step; a
    zero lr (or alpha = 0) starts V at zero. With alpha > 0 the first updates move each weight by about
    alpha/2 whatever the lr, by design. Defaults (the authors' code): lr 0.1, alpha 0.01, beta 0.9; the
    paper's text suggests alpha 0.05. No weight decay. State: velocity (1 word).

    Note: with alpha > 0 two optimizers on the same parameters draw different V_0 (the draw uses torch's
    global generator, so ``torch.manual_seed`` fixes it), and ``maximize`` does not mirror the trajectory.
    """

    hyperparams = {"lr": checks.nonnegative, "alpha": checks.nonnegative, "beta": checks.unit}
    weight_decay_mode = "custom"
    elementwise = False
    whole_tensor_reductions = True
    update = staticmethod(gravity_update)

    def __init__(self, params, lr=0.1, alpha=0.01, beta=0.9, *, maximize=False, **engine):
        defaults = dict(lr=lr, alpha=alpha, beta=beta, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        v = self.zeros_state(p)
        lr, alpha = self.lr(group), group["alpha"]
        if alpha > 0 and lr > 0 and v.device.type != "meta":
            if v.is_floating_point() and v.dtype in (torch.float32, torch.float64):
                v.normal_(0.0, alpha / lr)
            else:  # draw in float32, store in the low-precision (or complex) state dtype
                v.copy_(torch.empty_like(v, dtype=torch.float32).normal_(0.0, alpha / lr) if not v.is_complex()
                        else torch.empty_like(v).normal_(0.0, alpha / lr))
        return {"velocity": v}

    def scalars(self, group, step):
        t = step - 1
        beta = group["beta"]
        return dict(lr=self.lr(group), beta_hat=(beta * t + 1.0) / (t + 2.0))
