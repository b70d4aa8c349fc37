"""Torque-Aware Momentum: TAM (SGD-style) and AdaTAM / AdaTAMW (Adam-style)."""

from __future__ import annotations

import math

import torch

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register


def _cosines(xs, ys):
    """cos(x, y) of each pair of tensors over the whole tensor, as one vector; 0 where either is the zero tensor.

    The per-tensor numbers are stacked so that the arithmetic on them is a few vector ops, not a few per tensor.
    Compiled, the products and sums are float64 (free in a loop bound by memory): a float32 gradient above ~1e19
    has a square beyond float32's range, and inf / inf would turn the momentum and then the params NaN.
    """
    if mt.compiling():
        wide = [(x.double(), y.double()) for x, y in zip(xs, ys)]
        dots = torch.stack([(x * y).sum() for x, y in wide])
        prod = torch.stack([(x * x).sum().sqrt() * (y * y).sum().sqrt() for x, y in wide])
        nonzero = prod > 0
        cos = torch.where(nonzero, dots / torch.where(nonzero, prod, torch.ones_like(prod)), torch.zeros_like(prod))
        return cos.to(xs[0].dtype)
    if not mt.dot_friendly(list(xs) + list(ys)):
        dots = torch.stack(mt.dots(xs, ys))
        prod = torch.stack(mt.norms(xs)) * torch.stack(mt.norms(ys))
    else:
        # Each tensor's three products back to back: its second and third reads of x and y come from the cache,
        # not from memory (list by list, every tensor is read three times from memory).
        sums = torch.stack([torch.stack([torch.dot(x, y), torch.dot(x, x), torch.dot(y, y)])
                            for x, y in ((mt.flat(a, b), mt.flat(b, a)) for a, b in zip(xs, ys))])
        dots, prod = sums[:, 0], sums[:, 1].sqrt() * sums[:, 2].sqrt()
    nonzero = prod > 0
    return torch.where(nonzero, dots / torch.where(nonzero, prod, torch.ones_like(prod)), torch.zeros_like(prod))


def _damped_momentum_(momentum_buffer, grads, s, *, momentum, decay, eps):
    """s <- decay s + (1-decay) cos(m, g);  m <- momentum m + ((1 + s)/2 + eps) g  (one s per tensor)."""
    if not mt.compiling() and mt.dot_friendly(list(momentum_buffer) + list(grads) + list(s)) and all(
            x.shape == (1,) for x in s):
        # Eager on the CPU, the per-tensor numbers are host arithmetic on the dot products: a dozen 1-element tensor
        # ops per tensor, each run cache-cold after the tensor's streams, cost ~70 us a tensor (a 40-tensor,
        # 16.8M-parameter step: 0.75x the time of the stacked form; on 40 tiny tensors the two are alike).
        for m, g, s_i in zip(momentum_buffer, grads, s):
            mf, gf = mt.flat(m, g), mt.flat(g, m)
            dot, mm, gg = (float(torch.dot(a, b)) for a, b in ((mf, gf), (mf, mf), (gf, gf)))
            if not math.isfinite(dot + mm + gg) and mf.dtype == torch.float32:
                # A square beyond float32's range (a gradient above ~1e19): the cosine in float64, not inf / inf.
                mf, gf = mf.double(), gf.double()
                dot, mm, gg = (float(torch.dot(a, b)) for a, b in ((mf, gf), (mf, mf), (gf, gf)))
            prod = mm**0.5 * gg**0.5
            s_i.mul_(decay).add_(dot / prod if prod > 0 else 0.0, alpha=1.0 - decay)
            m.mul_(momentum).add_(g, alpha=(1.0 + float(s_i)) * 0.5 + eps)
        return
    cos = _cosines(momentum_buffer, grads)
    s_all = torch.cat(list(s))  # (n,), or (n, 2) for complex params viewed as real
    s_all = s_all * decay + cos.reshape(-1, *[1] * (s_all.dim() - 1)) * (1.0 - decay)
    mt.copy_(s, s_all.split(1))
    weights = (1.0 + s_all) * 0.5 + eps
    for m, g, w in zip(momentum_buffer, grads, weights):
        # The one-number weight broadcasts inside addcmul_ (no model-sized temporary for the weighted gradient).
        m.mul_(momentum).addcmul_(g, w)


def tam_update(params, grads, momentum_buffer, s, *, lr, momentum, decay, eps):
    """TAM: the damped momentum above, then p <- p - lr m."""
    _damped_momentum_(momentum_buffer, grads, s, momentum=momentum, decay=decay, eps=eps)
    mt.add_(params, momentum_buffer, -lr)


def adatam_update(params, grads, exp_avg, exp_avg_sq, s, *, lr, beta1, beta2, decay, eps):
    """AdaTAM: damped first moment, v <- b2 v + (1-b2) g^2, p <- p - lr m / (sqrt(v) + eps)."""
    _damped_momentum_(exp_avg, grads, s, momentum=beta1, decay=decay, eps=eps)
    # Elementwise from here: eager, a large tensor goes in flat pieces (its root's temporary stays a few MB).
    for ps, gs, ms, vs in mt.flat_pieces(params, grads, exp_avg, exp_avg_sq):
        mt.mul_(vs, beta2)
        mt.addcmul_(vs, gs, gs, 1.0 - beta2)
        denom = mt.sqrt(vs)
        mt.add_scalar_(denom, eps)
        mt.addcdiv_(ps, ms, denom, -lr)


_PAPER = "Malviya et al. 2024, Torque-Aware Momentum"


@register("tam", family="first-order", paper=_PAPER, arxiv="2412.18790",
          reference="paper equations (NumPy transcription in tests/optim/test_tam.py)", state_words=1,
          reread_words=2,  # m and g: cos(m, g) of the whole tensor, then m <- momentum m + w g
          status="experimental", example_kwargs={"lr": 0.05, "momentum": 0.9},
          search_space={"lr": ("log", 1e-2, 5.0), "one_minus_momentum": ("log", 1e-3, 0.5),
                        "weight_decay": ("log", 1e-7, 1e-2)})
class TAM(Optimizer):
    """TAM: Torque-Aware Momentum (Malviya et al. 2024, "Torque-Aware Momentum", arXiv 2412.18790).

    The gradient's contribution to the momentum is damped by how well it aligns with the momentum:

        S_t = cos(m_{t-1}, g_t);   s_t = decay s_{t-1} + (1 - decay) S_t;   d_t = (1 + s_t) / 2
        m_t = momentum m_{t-1} + (d_t + eps) g_t;   p <- p - lr m_t

    with m_0 = 0 and s_0 = 0; cos(0, g) is taken as 0 (so d_1 = 1/2). The cosine is per parameter tensor
    (the paper writes it over "the" parameter vector; per-tensor is how layer-wise optimizers apply it),
    so the update is not elementwise. Weight decay is L2 (g <- g + wd p), as torch.optim.SGD.
    Defaults: lr 1e-3, momentum 0.9, decay 0.9, eps 1e-8. State: momentum_buffer (1 word) and s (one
    scalar per tensor).

    Note the momentum is undamped (no 1 - momentum factor) and the gradient enters with a weight in
    [eps, 1 + eps]: the paper's learning-rate transfer from SGD-momentum scales lr by about 1/E[d_t].
    Marked experimental: the equations are transcribed from secondary statements of the paper (its
    algorithm box could not be read here); pytorch_optimizer's port differs in starting m_0 = g_1 (so
    S_1 = 1) and in taking the cosine row-wise (normalize along dim 0) rather than per tensor.
    """

    hyperparams = {"lr": checks.nonnegative, "momentum": checks.unit, "decay": checks.unit,
                   "eps": checks.nonnegative, "weight_decay": checks.nonnegative}
    weight_decay_mode = "l2"
    elementwise = False
    whole_tensor_reductions = True
    update = staticmethod(tam_update)

    def __init__(self, params, lr=1e-3, momentum=0.9, decay=0.9, eps=1e-8, weight_decay=0.0, *, maximize=False,
                 **engine):
        defaults = dict(lr=lr, momentum=momentum, decay=decay, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def _scalar_state(self, p):
        # Shape (1,), not 0-dim: torch.compile(dynamic=True) drops in-place writes to 0-dim tensor inputs.
        return torch.zeros(1, dtype=self.state_dtype_for(p), device=p.device)

    def init_state(self, p, group):
        return {"momentum_buffer": self.zeros_state(p), "s": self._scalar_state(p)}

    def scalars(self, group, step):
        return dict(lr=self.lr(group), momentum=group["momentum"], decay=group["decay"], eps=group["eps"])


class _AdaTAMBase(TAM):
    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "decay": checks.unit,
                   "eps": checks.positive, "weight_decay": checks.nonnegative}
    update = staticmethod(adatam_update)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), decay=0.9, eps=1e-8, weight_decay=0.0, *,
                 maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, decay=decay, eps=eps,
                        weight_decay=weight_decay, maximize=maximize)
        Optimizer.__init__(self, params, defaults, **engine)

    def init_state(self, p, group):
        return {"exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p), "s": self._scalar_state(p)}

    def scalars(self, group, step):
        beta1, beta2 = group["betas"]
        return dict(lr=self.lr(group), beta1=beta1, beta2=beta2, decay=group["decay"], eps=group["eps"])


_ADATAM_DOC = """

    m_t = b1 m_{t-1} + (d_t + eps) g_t  (d_t as in :class:`TAM`, from cos(m_{t-1}, g_t) per tensor)
    v_t = b2 v_{t-1} + (1 - b2) g_t^2;   p <- p - lr m_t / (sqrt(v_t) + eps)

    One eps serves as the damping floor and the denominator term. There is no bias correction and no
    1 - b1 factor on the first moment; this follows the only public transcription we could read
    (pytorch_optimizer's AdaTAM), as the paper's algorithm box could not be checked here, which is
    why the method is marked experimental. Defaults: lr 1e-3, betas (0.9, 0.999), decay 0.9, eps 1e-8.
    State: exp_avg, exp_avg_sq (2 words) and s (one scalar per tensor).
"""


@register("adatam", family="first-order", paper=_PAPER, arxiv="2412.18790",
          reference="paper equations as transcribed by pytorch_optimizer (NumPy transcription in tests)",
          state_words=2, status="experimental", example_kwargs={"lr": 1e-2}, reread_words=2,
          search_space={"lr": ("log", 1e-5, 1e-2), "one_minus_beta1": ("log", 4e-3, 0.1)})
class AdaTAM(_AdaTAMBase):
    __doc__ = ("AdaTAM: Adam-style Torque-Aware Momentum (Malviya et al. 2024, arXiv 2412.18790), L2 weight "
               "decay (g <- g + wd p)." + _ADATAM_DOC)
    weight_decay_mode = "l2"


@register("adatamw", family="first-order", paper=_PAPER, arxiv="2412.18790",
          reference="paper equations as transcribed by pytorch_optimizer (NumPy transcription in tests)",
          state_words=2, status="experimental", example_kwargs={"lr": 1e-2, "weight_decay": 1e-2},
          reread_words=2,
          search_space={"lr": ("log", 1e-5, 1e-2), "one_minus_beta1": ("log", 4e-3, 0.1),
                        "weight_decay": ("log", 5e-3, 1.0)})
class AdaTAMW(_AdaTAMBase):
    __doc__ = ("AdaTAMW: AdaTAM (Malviya et al. 2024, arXiv 2412.18790) with decoupled weight decay "
               "(p <- p (1 - lr wd) before the update, as AdamW)." + _ADATAM_DOC)
    weight_decay_mode = "decoupled"
