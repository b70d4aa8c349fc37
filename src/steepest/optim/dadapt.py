"""D-Adaptation for Adam and SGD (Defazio & Mishchenko 2023)."""

from __future__ import annotations

import math

from ..core import checks
from ..core import multitensor as mt
from ..core.global_step import GlobalStepOptimizer, growth_rate_check, l1_norms, sq_norms, total
from ..core.registry import register

_DADAPT_SKIP = {
    "compile": "the step reduces over all tensors to host scalars (the D estimate) between two passes: it runs "
               "the eager for-each path only",
    "param_groups": "D is estimated jointly over all param groups, so one optimizer over two groups is not two "
                    "optimizers; groups share one lr (or 0), as in the authors' code",
}


@register("dadapt_adam", family="parameter-free",
          paper="Defazio & Mishchenko 2023, Learning-Rate-Free Learning by D-Adaptation", arxiv="2301.07733",
          reference="dadaptation 3.2 (DAdaptAdam)", state_words=3, example_kwargs={"lr": 1.0},
          conformance_skip=_DADAPT_SKIP, search_space={"lr": ("log", 0.3, 3.0)})
class DAdaptAdam(GlobalStepOptimizer):
    """D-Adaptation Adam (Defazio & Mishchenko 2023, "Learning-Rate-Free Learning by D-Adaptation",
    arXiv 2301.07733), as the authors' package ``dadaptation`` 3.2 (``DAdaptAdam``).

    With dlr = d lr bc (bc = sqrt(1-b2^(k+1))/(1-b1^(k+1)) if ``use_bias_correction``, else 1) and the
    layer scale r of each group, per step k over all tensors:

        num   += r dlr <g, s / (sqrt(v) + eps)>          (v, s before this step's update)
        m  = b1 m + r dlr (1-b1) g;   v = b2 v + (1-b2) g^2;   s = sqrt(b2) s + dlr (1-sqrt(b2)) g
        N  = sqrt(b2) N + (1-sqrt(b2)) num;   d_hat = N / ((1-sqrt(b2)) sum_groups r ||s||_1)
        d  = max(d, min(d_hat, d growth_rate))
        p <- p (1 - wd dlr) [decouple];   p <- p - m / (sqrt(v) + eps)

    ``lr`` multiplies the adapted step (leave it at 1). Weight decay is L2 (g <- g + wd p) unless
    ``decouple=True`` (AdamW style, scaled by dlr). ``layer_scale`` (a param-group option) scales a
    group's step. Defaults: lr 1, betas (0.9, 0.999), eps 1e-8, weight_decay 0, d0 1e-6,
    growth_rate inf. State: s, exp_avg, exp_avg_sq (3 words); d, k and N live in every param group
    (``group["d"]`` is the current D estimate).

    Differences from the package: betas, decouple, use_bias_correction, d0 and growth_rate must agree
    across param groups (the package silently reads group 0); p.grad is never modified (the package adds
    L2 decay into it); no ``log_every`` or FSDP all-reduce (single process). If sum ||s||_1 is zero
    (all gradients zero so far) the moments are updated and nothing else, as in the package.
    """

    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "eps": checks.positive,
                   "weight_decay": checks.nonnegative, "decouple": checks.boolean,
                   "use_bias_correction": checks.boolean, "d0": checks.positive, "growth_rate": growth_rate_check,
                   "layer_scale": checks.nonnegative}
    shared_options = ("betas", "decouple", "use_bias_correction", "d0", "growth_rate")

    def __init__(self, params, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decouple=False,
                 use_bias_correction=False, d0=1e-6, growth_rate=math.inf, layer_scale=1.0, *, maximize=False,
                 **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, decouple=decouple, use_bias_correction=use_bias_correction,
                        d0=d0, growth_rate=growth_rate, layer_scale=layer_scale, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"s": self.zeros_state(p), "exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}

    def global_step(self, work):
        g0 = self.param_groups[0]
        lr = self.shared_lr()
        beta1, beta2 = g0["betas"]
        k, d, nw = g0.get("k", 0), g0.get("d", g0["d0"]), g0.get("numerator_weighted", 0.0)
        decouple, growth_rate = g0["decouple"], g0["growth_rate"]
        bc = (1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1)) if g0["use_bias_correction"] else 1.0
        dlr = d * lr * bc
        sqrt_beta2 = beta2**0.5
        buckets = self.buckets(work)
        acc, sk_l1 = 0.0, 0.0
        for b in buckets:
            group = b.group
            decay, eps, r = group["weight_decay"], group["eps"], group["layer_scale"]
            if self.lr(group) == 0:
                continue
            dots, l1 = [], []
            for c in b.pieces():
                g = mt.add(c.g, c.p, alpha=decay) if decay != 0 and not decouple else c.g
                s, m, v = c.s["s"], c.s["exp_avg"], c.s["exp_avg_sq"]
                denom = mt.sqrt(v)
                mt.add_scalar_(denom, eps)
                dots += mt.dots(g, mt.div(s, denom))
                mt.mul_(m, beta1)
                mt.add_(m, g, r * dlr * (1 - beta1))
                mt.mul_(v, beta2)
                mt.addcmul_(v, g, g, 1 - beta2)
                mt.mul_(s, sqrt_beta2)
                mt.add_(s, g, dlr * (1 - sqrt_beta2))
                l1 += l1_norms(s)
            acc += r * dlr * total(dots)
            sk_l1 += r * total(l1)
        nw = sqrt_beta2 * nw + (1 - sqrt_beta2) * acc
        if sk_l1 == 0:
            for b in buckets:
                b.write_back()
            return
        if lr > 0:
            d_hat = nw / ((1 - sqrt_beta2) * sk_l1)
            d = max(d, min(d_hat, d * growth_rate))
        for group in self.param_groups:
            group.update(numerator_weighted=nw, d=d, k=k + 1)
        for b in buckets:
            decay, eps = b.group["weight_decay"], b.group["eps"]
            for c in b.pieces():
                denom = mt.sqrt(c.s["exp_avg_sq"])
                mt.add_scalar_(denom, eps)
                if decay != 0 and decouple:
                    mt.add_(c.p, c.p, -decay * dlr)
                mt.addcdiv_(c.p, c.s["exp_avg"], denom, -1.0)
            b.write_back()
        self.count_step(buckets)


@register("dadapt_sgd", family="parameter-free",
          paper="Defazio & Mishchenko 2023, Learning-Rate-Free Learning by D-Adaptation", arxiv="2301.07733",
          reference="dadaptation 3.2 (DAdaptSGD)", state_words=2, example_kwargs={"lr": 1.0, "momentum": 0.9},
          conformance_skip=_DADAPT_SKIP, search_space={"lr": ("log", 0.3, 3.0)})
class DAdaptSGD(GlobalStepOptimizer):
    """D-Adaptation SGD (Defazio & Mishchenko 2023, "Learning-Rate-Free Learning by D-Adaptation",
    arXiv 2301.07733), as the authors' package ``dadaptation`` 3.2 (``DAdaptSGD``): dual averaging with
    momentum written as an average of the dual-averaging iterate z.

    g0 = ||g_0|| (taken once, at the first step), dlr = d lr / g0, and per step over all tensors
    (g includes L2 weight decay, g <- g + wd p):

        N += dlr <g, s>;   s += dlr g;   d_hat = 2 N / ||s||;   d = max(d, min(d_hat, d growth_rate))
        z = x0 - s;   p <- (1 - ck) p + ck z   with ck = 1 - momentum

    ``lr`` multiplies the adapted step (leave it at 1). Defaults: lr 1, momentum 0, weight_decay 0,
    d0 1e-6, growth_rate inf. State: s and x0 (2 words); d, k, N and g0_norm live in every param group.

    Differences from the package: z is not stored (it is x0 - s, recomputed: 2 words instead of 3);
    momentum, weight_decay, d0 and growth_rate must agree across groups (the package reads group 0);
    p.grad is never modified; single process only. A first step whose gradients are all zero changes
    nothing and is not counted (the package divides by ||g_0|| = 0 there and raises ZeroDivisionError).
    As in the package, ||g_0|| leaves weight decay out (the package's ``grad.add`` there is not in place).
    """

    hyperparams = {"lr": checks.nonnegative, "momentum": checks.unit, "weight_decay": checks.nonnegative,
                   "d0": checks.positive, "growth_rate": growth_rate_check}
    shared_options = ("momentum", "weight_decay", "d0", "growth_rate")

    def __init__(self, params, lr=1.0, momentum=0.0, weight_decay=0.0, d0=1e-6, growth_rate=math.inf, *,
                 maximize=False, **engine):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, d0=d0, growth_rate=growth_rate,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"s": self.zeros_state(p), "x0": self.copy_state(p)}

    def global_step(self, work):
        g0 = self.param_groups[0]
        lr = self.shared_lr()
        decay, momentum, growth_rate = g0["weight_decay"], g0["momentum"], g0["growth_rate"]
        ck = 1 - momentum
        k, d, nw = g0.get("k", 0), g0.get("d", g0["d0"]), g0.get("numerator_weighted", 0.0)
        buckets = self.buckets(work)
        if k == 0:
            g0_norm = math.sqrt(sum(total(sq_norms(b.g)) for b in buckets if self.lr(b.group) > 0))
            if g0_norm == 0:
                return
        else:
            g0_norm = g0["g0_norm"]
        dlr = d * lr / g0_norm
        sk_sq = 0.0
        for b in buckets:
            b.g = mt.add(b.g, b.p, alpha=decay) if decay != 0 else b.g
            if self.lr(b.group) > 0:
                s = b.s["s"]
                nw += dlr * total(mt.dots(b.g, s))
                mt.add_(s, b.g, dlr)
                sk_sq += total(sq_norms(s))
        if lr > 0:
            d_hat = 2 * nw / math.sqrt(sk_sq) if sk_sq > 0 else d
            d = max(d, min(d_hat, d * growth_rate))
        if sk_sq == 0:
            for b in buckets:
                b.write_back()
            return
        for group in self.param_groups:
            group.update(numerator_weighted=nw, d=d, g0_norm=g0_norm, k=k + 1)
        for b in buckets:
            z = mt.sub(b.s["x0"], b.s["s"])
            mt.mul_(b.p, 1 - ck)
            mt.add_(b.p, z, ck)
            b.write_back()
        self.count_step(buckets)
