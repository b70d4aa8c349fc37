"""AdamP and SGDP: Adam and SGD with the radial component of the update projected out (Heo et al. 2021)."""

from __future__ import annotations

import math

import torch

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register
from .adam import adam_scalars


def _project(p, grad, perturb, delta, wd_ratio, eps):
    """The authors' ``_projection``, from one pass of per-row sums.

    For a parameter of 2+ dims: if the largest |cos(grad, p)| over its output channels (rows of
    p.reshape(shape[0], -1)) is below delta/sqrt(fan-in), remove the per-channel component of ``perturb``
    along p; else, if |cos| over the whole tensor is below delta/sqrt(numel), remove the whole-tensor
    component; else leave it. Returns (perturb, weight-decay ratio): wd_ratio where a projection happened,
    else 1 (None for 0/1-dim params).

    The projection is computed as perturb - p <p, perturb> / (||p|| + eps)^2, the authors'
    perturb - p_n <p_n, perturb> with p_n = p / (||p|| + eps) up to rounding, without p_n's temporaries.
    Eager, the authors' sequence: each view's cosine in turn, stopping at the first that projects (one host
    read per view tried), perturb projected in place. Traced for a compiled kernel, every sum comes from the
    rows' sums of g p, g^2, p^2 and p perturb (the whole tensor's are their totals), read in one pass and
    selected with ``torch.where`` (no host synchronisation: one kernel of two passes). The cosine clamps each
    norm at eps, as ``torch.nn.functional.cosine_similarity``.
    """
    if p.dim() <= 1 or p.numel() == 0:
        return perturb, None
    if not mt.compiling():
        return _project_eager(p, grad, perturb, delta, wd_ratio, eps)
    rows = p.shape[0]
    pv, gv, uv = p.reshape(rows, -1), grad.reshape(rows, -1), perturb.reshape(rows, -1)
    gp, gg, pp, pu = (gv * pv).sum(1), (gv * gv).sum(1), (pv * pv).sum(1), (pv * uv).sum(1)

    def below(gp, gg, pp, size):
        cos = (gp / (gg.sqrt().clamp_min(eps) * pp.sqrt().clamp_min(eps))).abs()
        # sym_sqrt keeps the size symbolic when traced: one compiled kernel serves every shape.
        return cos.max() < delta / torch.sym_sqrt(size)

    channel = below(gp, gg, pp, pv.shape[1])
    layer = below(gp.sum(), gg.sum(), pp.sum(), p.numel())
    per_channel = pu / (pp.sqrt() + eps) ** 2
    whole = pu.sum() / (pp.sum().sqrt() + eps) ** 2
    coef = mt.realize(torch.where(channel, per_channel, whole.expand_as(per_channel)))
    applies = mt.realize(channel | layer)
    projected = (uv - pv * coef.view(-1, 1)).view(p.shape)
    one = p.new_ones(())
    return torch.where(applies, projected, perturb), mt.realize(torch.where(applies, one * wd_ratio, one))


def _project_eager(p, grad, perturb, delta, wd_ratio, eps):
    """:func:`_project` in the authors' order, perturb projected in place."""
    view = _small_cosine_view(p, grad, delta, eps)
    if view is None:
        return perturb, 1.0
    return _remove_radial_(perturb, p, *view, eps), wd_ratio


def _small_cosine_view(p, grad, delta, eps):
    """The first view, in the authors' order (output channels, then the whole tensor), whose largest |cos(g, p)|
    is below delta/sqrt(view size), as (view rows, ||p|| per row); None if neither (one host read per view).

    The cosines come from per-row dot products and norms (the whole tensor's are their totals, taken on the host:
    a dozen 1-element tensor ops there cost more than the rows' reductions on a small tensor), the numbers of
    ``cosine_similarity`` up to rounding.
    """
    rows = p.shape[0]
    pv, gv = mt.rows(p, rows, grad), mt.rows(grad, rows, p)
    # vecdot, not einsum: einsum runs a row-wise dot as a batched matrix product, 4x slower here.
    dot = mt.row_dots(gv, pv)
    g_norm, p_norm = torch.linalg.vector_norm(gv, dim=1), torch.linalg.vector_norm(pv, dim=1)
    cos = dot.abs().div_(g_norm.clamp_min(eps).mul_(p_norm.clamp_min(eps)))
    if float(cos.max()) < delta / math.sqrt(p.numel() // rows):
        return rows, p_norm
    g_total = math.sqrt(float(torch.dot(g_norm, g_norm)))
    p_total = math.sqrt(float(torch.dot(p_norm, p_norm)))
    if abs(float(dot.sum())) / (max(g_total, eps) * max(p_total, eps)) < delta / math.sqrt(p.numel()):
        return 1, p_norm.new_full((1,), p_total)
    return None


def _remove_radial_(perturb, p, view_rows, p_norm, eps):
    """perturb <- perturb - p <p, perturb> / (||p|| + eps)^2 per view row: one read for the dots, one in-place
    pass (the authors' perturb - p_n <p_n, perturb> up to rounding)."""
    along = mt.row_dots(mt.rows(p, view_rows, perturb), mt.rows(perturb, view_rows, p))
    coef = along / (p_norm + eps).square()
    return perturb.addcmul_(p, coef.view([-1] + [1] * (p.dim() - 1)), value=-1.0)


def _decay_and_step(p, perturb, ratio, lr, wd_coef, step_size):
    """p <- p (1 - lr wd ratio) - step_size perturb, as the package (decay skipped when wd = 0)."""
    if wd_coef is not None:
        p.mul_(mt.realize(1.0 - wd_coef if ratio is None else 1.0 - wd_coef * ratio))
    if isinstance(step_size, torch.Tensor):
        p.add_(perturb * -step_size)
    else:
        p.add_(perturb, alpha=-step_size)  # no temporary: a parameter-sized one per tensor costs page faults


def adamp_update(params, grads, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, scaled_eps, step_size, delta,
                 wd_ratio, wd_coef, nesterov=False, decay=False):
    """Adam moments, then per tensor: projection, decoupled weight decay scaled by the ratio, step.

    The direction is m / (sqrt(v) + eps sqrt(bc2)) and the step size lr sqrt(bc2)/bc1 (``adam_scalars``): the
    package's lr/bc1 m / (sqrt(v)/sqrt(bc2) + eps) in one pass fewer (the projection is linear in the direction
    and the cosine test reads only g and p, so the scale moves through it)."""
    mt.lerp_(exp_avg, grads, 1.0 - beta1)
    mt.mul_(exp_avg_sq, beta2)
    mt.addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
    denom = mt.sqrt(exp_avg_sq)
    mt.add_scalar_(denom, scaled_eps)
    if nesterov:
        num = mt.lerp(exp_avg, grads, 1.0 - beta1)
    else:
        num = exp_avg
    step_size = mt.realize(step_size)
    for p, g, n, d in zip(params, grads, num, denom):
        perturb, ratio = _project(p, g, torch.div(n, d, out=d), delta, wd_ratio, eps)  # denom is scratch
        _decay_and_step(p, perturb, ratio, lr, wd_coef if decay else None, step_size)


def sgdp_update(params, grads, momentum_buffer, *, lr, momentum, dampening, eps, delta, wd_ratio, wd_coef,
                nesterov=False, decay=False):
    """buf <- momentum buf + (1 - dampening) g (buf_0 = 0); d = g + momentum buf (nesterov) or buf;
    then per tensor: projection, weight decay lr wd ratio / (1 - momentum), p <- p - lr d."""
    mt.mul_(momentum_buffer, momentum)
    mt.add_(momentum_buffer, grads, 1.0 - dampening)
    direction = mt.add(grads, momentum_buffer, momentum) if nesterov else momentum_buffer
    for p, g, d in zip(params, grads, direction):
        perturb, ratio = _project(p, g, d, delta, wd_ratio, eps)  # eager: d itself, projected in place
        if not nesterov and perturb is not d:
            d.copy_(perturb)  # the package projects its buffer in place: the buffer keeps the projection
        _decay_and_step(p, perturb, ratio, lr, wd_coef if decay else None, lr)


_PROJECTION_NOTE = """
    The projection (Heo et al. 2021, Algorithm 1 and the authors' ``_projection``): for a parameter with
    2+ dims, if max over output channels of |cos(g, p)| < delta / sqrt(fan-in), the update loses its
    per-channel component along p (p_n = p / (||p|| + eps) per channel); otherwise, if |cos(g, p)| over
    the whole tensor < delta / sqrt(numel), it loses its whole-tensor component; when a projection
    happens, weight decay is scaled by ``wd_ratio``. 0- and 1-dim parameters are never projected.
    Eager, the views are tried in the package's order (one host read each); the compiled kernel takes
    every sum from one pass of per-row sums and selects with ``torch.where`` (no host synchronisation):
    the package's result up to rounding. With ``compile``, a parameter of 2+ dims runs as its
    (shape[0], rest) matrix, so one kernel serves every shape. Zero-size parameters are left
    unprojected (the package fails on them).
"""


@register("adamp", family="first-order",
          paper="Heo et al. 2021, AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant "
                "Weights", arxiv="2006.08217", reference="clovaai/AdamP (adamp on PyPI)", state_words=2,
          reread_words=3,  # p, m, v: per-row sums of g p, g^2, p^2, p u (u = m / (sqrt(v) + eps)), then p <- p - u
          example_kwargs={"lr": 1e-2, "weight_decay": 1e-2},
          search_space={"lr": ("log", 1e-4, 1e-1), "one_minus_beta1": ("log", 4e-3, 0.1),
                        "weight_decay": ("log", 5e-3, 1.0)})
class AdamP(Optimizer):
    """AdamP (Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha 2021, "AdamP: Slowing Down the Slowdown for Momentum
    Optimizers on Scale-invariant Weights", ICLR 2021, arXiv 2006.08217), as the ``adamp`` package.

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  u = m / (sqrt(v)/sqrt(1-b2^t) + eps)
    (nesterov: u = (b1 m + (1-b1) g) / (...));  u <- Proj(u);  p <- p (1 - lr wd r) - lr/(1-b1^t) u,
    with r = wd_ratio where the projection applied, else 1. Weight decay is decoupled (as AdamW).
    Defaults (the package's): lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0, delta 0.1,
    wd_ratio 0.1, nesterov False. State: exp_avg, exp_avg_sq (2 words).
    """

    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "eps": checks.positive,
                   "weight_decay": checks.nonnegative, "delta": checks.nonnegative, "wd_ratio": checks.nonnegative,
                   "nesterov": checks.boolean}
    weight_decay_mode = "custom"
    elementwise = False
    matrix_view = True
    # Inductor realizes the direction m / (sqrt(v) + eps) (read by the rows' sums and by the step) into a
    # param-sized buffer at its default threshold of 4 reads: 12 words a step at memory speed on a matrix beyond
    # the cache, where recomputing it from m and v moves 10. A/B, fused: one 4096 x 4096 matrix, new/old 0.52
    # (22.8 against 43.4 ms); on 410 x 1023 matrices, which stay in the cache between the loops, recomputing costs
    # more (1.19): the large-matrix kernel serves the matrices where large ones hold most of their elements.
    inductor_config_large = {"realize_reads_threshold": 100}
    update = staticmethod(adamp_update)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
                 nesterov=False, *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, nesterov=nesterov,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}

    def scalars(self, group, step):
        beta1, beta2 = group["betas"]
        lr = self.lr(group)
        return dict(lr=lr, beta1=beta1, beta2=beta2, delta=group["delta"], wd_ratio=group["wd_ratio"],
                    wd_coef=lr * group["weight_decay"],
                    **adam_scalars(lr, group["eps"], 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)))

    def static_options(self, group):
        # eps is static (a Python float, part of the compiled kernel's key): the cosine similarity takes it as
        # a number, which a traced kernel would otherwise fix at its first value.
        return {"nesterov": group["nesterov"], "decay": group["weight_decay"] > 0, "eps": group["eps"]}


@register("sgdp", family="first-order",
          paper="Heo et al. 2021, AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant "
                "Weights", arxiv="2006.08217", reference="clovaai/AdamP (adamp on PyPI)", state_words=1,
          # p, g, buf: per-row sums of g p, g^2, p^2, p buf' (buf' = momentum buf + g), then buf' is projected in
          # place and p <- p - buf'. buf' is needed again after the sums: recomputed from g and buf, or stored and
          # read back (one more write), one word more than AdamP, whose moments are final before the projection.
          reread_words=3,
          example_kwargs={"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
          search_space={"lr": ("log", 2e-2, 5.0), "one_minus_momentum": ("log", 1e-3, 0.5),
                        "weight_decay": ("log", 1e-7, 1e-2)})
class SGDP(Optimizer):
    """SGDP (Heo et al. 2021, arXiv 2006.08217): SGD with the AdamP projection, as the ``adamp`` package.

    buf = momentum buf + (1 - dampening) g (buf starts at zero; unlike torch.optim.SGD the first step does
    not copy g); d = g + momentum buf (nesterov) or buf; d <- Proj(d);
    p <- p (1 - lr wd r / (1 - momentum)) - lr d, with r = wd_ratio where the projection applied, else 1.
    Weight decay is decoupled and divided by (1 - momentum), as the package. With nesterov=False the
    package's direction d *is* the momentum buffer and its projection runs in place, so the buffer keeps
    the projected value (the paper's Algorithm 2 keeps the buffer unprojected); this implementation does
    the same as the package, so that the trajectories agree.
    Defaults: lr 1e-3 (the package requires one), momentum 0, dampening 0, weight_decay 0, nesterov False,
    eps 1e-8, delta 0.1, wd_ratio 0.1. State: momentum_buffer (1 word, also with momentum 0, as the package).
    """

    loads_stepless_state = True  # the adamp package counts no steps
    package_state_names = {"momentum": "momentum_buffer"}
    hyperparams = {"lr": checks.nonnegative, "momentum": checks.unit, "dampening": checks.real(0.0, 1.0),
                   "weight_decay": checks.nonnegative, "nesterov": checks.boolean, "eps": checks.positive,
                   "delta": checks.nonnegative, "wd_ratio": checks.nonnegative}
    weight_decay_mode = "custom"
    elementwise = False
    matrix_view = True
    update = staticmethod(sgdp_update)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, eps=1e-8,
                 delta=0.1, wd_ratio=0.1, *, maximize=False, **engine):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"momentum_buffer": self.zeros_state(p)}

    def scalars(self, group, step):
        lr = self.lr(group)
        momentum = group["momentum"]
        return dict(lr=lr, momentum=momentum, dampening=group["dampening"],
                    delta=group["delta"], wd_ratio=group["wd_ratio"],
                    wd_coef=lr * group["weight_decay"] / (1.0 - momentum))

    def static_options(self, group):
        # eps is static (a Python float, part of the compiled kernel's key): the cosine similarity takes it as
        # a number, which a traced kernel would otherwise fix at its first value.
        return {"nesterov": group["nesterov"], "decay": group["weight_decay"] > 0, "eps": group["eps"]}


AdamP.__doc__ += _PROJECTION_NOTE
SGDP.__doc__ += _PROJECTION_NOTE
