"""NovoGrad: SGD with momentum on gradients normalised per layer (Ginsburg et al. 2019)."""

from __future__ import annotations

import math

import torch

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.precision import working_dtype
from ..core.registry import register


def novograd_update(params, grads, exp_avg, exp_avg_sq, *, lr, beta1, beta2_t, eps, weight_decay, grad_scale,
                    decay=False):
    """v <- b2_t v + (1-b2_t) ||g||^2 (b2_t = 0 on the first step: v_1 = ||g_1||^2);
    m <- b1 m + grad_scale (g / sqrt(v + eps) + wd p);  p <- p - lr m."""
    if not mt.compiling() and mt.dot_friendly(list(grads) + list(exp_avg) + list(exp_avg_sq)):
        # Eager on the CPU, v and the per-tensor factor are host arithmetic on the squared norm, not 1-element
        # tensor ops run cache-cold after each tensor's streams (a 40-tensor, 16.8M-parameter step: 0.84-0.90x the
        # time of the list form).
        for m, g, v in zip(exp_avg, grads, exp_avg_sq):
            flat = mt.flat(g)
            v.mul_(beta2_t).add_(float(torch.dot(flat, flat)), alpha=1.0 - beta2_t)
            shifted = float(v) + eps
            # A NaN (or a negative v loaded from a state dict) gives a NaN factor, as the tensor form does.
            m.mul_(beta1).add_(g, alpha=grad_scale / math.sqrt(shifted) if shifted >= 0 else math.nan)
    else:
        _normalised_momentum_(grads, exp_avg, exp_avg_sq, beta1=beta1, beta2_t=beta2_t, eps=eps,
                              grad_scale=grad_scale)
    if decay:
        mt.add_(exp_avg, params, grad_scale * weight_decay)
    mt.add_(params, exp_avg, -lr)


def _normalised_momentum_(grads, exp_avg, exp_avg_sq, *, beta1, beta2_t, eps, grad_scale):
    """v <- b2_t v + (1-b2_t) ||g||^2 and m <- b1 m + grad_scale g / sqrt(v + eps), list by list."""
    sq = mt.squared_norms(grads)
    for v, s in zip(exp_avg_sq, sq):
        v.mul_(beta2_t).add_(s * (1.0 - beta2_t))
    mt.mul_(exp_avg, beta1)
    for m, g, v in zip(exp_avg, grads, exp_avg_sq):
        # One pass, no gradient-sized temporary: the per-tensor factor c / sqrt(v + eps) broadcasts inside
        # addcmul_ (v has shape (1,); without its leading dim it broadcasts to 0-dim tensors too).
        # Compiled, the factor is computed once into a buffer, not again (a root and a division) for every vector
        # of the tensor's loop.
        m.addcmul_(g, mt.realize((grad_scale / (v + eps).sqrt()).reshape(v.shape[1:])))


@register("novograd", family="first-order",
          paper="Ginsburg et al. 2019, Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training "
                "of Deep Networks", arxiv="1905.11286",
          reference="paper Algorithm 1; NVIDIA OpenSeq2Seq NovoGrad2 (float64 NumPy transcription in the tests)",
          state_words=1, example_kwargs={"lr": 1e-2, "weight_decay": 1e-3},
          reread_words=1,  # g: ||g||^2 of the tensor, then m <- b1 m + c g / sqrt(v + eps)
          search_space={"lr": ("log", 1e-3, 0.1), "one_minus_beta1": ("log", 1e-2, 0.2),
                        "weight_decay": ("log", 1e-4, 1e-1)})
class NovoGrad(Optimizer):
    """NovoGrad (Ginsburg, Castonguay, Hrinchuk, Kuchaiev, Lavrukhin, Leary, Li, Nguyen, Zhang, Cohen 2019,
    "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of Deep Networks",
    arXiv 1905.11286), Algorithm 1. Each tensor is one layer l::

        v_1 = ||g_1||^2;           v_t = b2 v_{t-1} + (1-b2) ||g_t||^2      (a scalar per tensor)
        m_t = b1 m_{t-1} + c (g_t / sqrt(v_t + eps) + wd p_t)             (m_0 = 0)
        p  <- p - lr m_t

    c = 1, or c = 1 - b1 with ``grad_averaging=True``. Weight decay is added to the normalised gradient
    (inside the momentum), as the paper, not decoupled as AdamW. eps sits inside the square root, as the
    OpenSeq2Seq ``NovoGrad2`` the paper's experiments ran; the paper writes no eps on the first step (a
    1e-8 shift of v_1, kept here for one formula). Defaults (OpenSeq2Seq's): lr 1e-3, betas
    (0.95, 0.98), eps 1e-8, weight_decay 0, grad_averaging False. State: exp_avg (1 word) and
    exp_avg_sq, one number per tensor (a shape-(1,) tensor in the param's working dtype: float32 for 16-bit params,
    whatever ``state_dtype`` says).

    Differences from NVIDIA's code: OpenSeq2Seq and NeMo start v from ||g||^2 whenever the stored v is
    exactly 0 (so a layer whose first gradients are zero starts later); here v_1 = ||g_1||^2 on the first
    step, as the paper. NeMo's PyTorch ``Novograd`` puts eps outside the root (g / (sqrt(v) + eps)) and
    has an ``amsgrad`` option that is not here.
    """

    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "eps": checks.positive,
                   "weight_decay": checks.nonnegative, "grad_averaging": checks.boolean}
    weight_decay_mode = "custom"
    elementwise = False
    whole_tensor_reductions = True
    update = staticmethod(novograd_update)

    def __init__(self, params, lr=1e-3, betas=(0.95, 0.98), eps=1e-8, weight_decay=0.0, grad_averaging=False, *,
                 maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, grad_averaging=grad_averaging, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        # The param's working dtype, not a 16-bit state_dtype: one number per tensor costs no memory, and its
        # rounding would scale every step of the tensor.
        dtype = working_dtype(p.dtype) if p.is_floating_point() else p.real.dtype
        # Shape (1,), not 0-dim: torch.compile (2.13) drops in-place writes to 0-dim tensor inputs.
        return {"exp_avg": self.zeros_state(p), "exp_avg_sq": torch.zeros(1, dtype=dtype, device=p.device)}

    def scalars(self, group, step):
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        return dict(lr=self.lr(group), beta1=beta1, beta2_t=0.0 if step == 1 else beta2, eps=group["eps"],
                    weight_decay=wd,
                    grad_scale=1.0 - beta1 if group["grad_averaging"] else 1.0)

    def static_options(self, group):
        return {"decay": group["weight_decay"] != 0}
