"""D-Adaptation for Adam and SGD (Defazio & Mishchenko 2023)."""

from __future__ import annotations

import logging
import math
import warnings

from ..core import checks
from ..core import multitensor as mt
from ..core.global_step import GlobalStepOptimizer, growth_rate_check, total
from ..core.registry import register

_LOG = logging.getLogger(__name__)

_DADAPT_SKIP = {
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
    group's step. ``log_every=n`` logs the D estimate every n steps (``logging``, INFO), as the package.
    Defaults: lr 1, betas (0.9, 0.999), eps 1e-8, weight_decay 0, log_every 0, d0 1e-6,
    growth_rate inf. State: s, exp_avg, exp_avg_sq (3 words); d, k and N live in every param group
    (``group["d"]`` is the current D estimate).

    ``fsdp_in_use=True`` (the package's switch; on by itself for params that torch's FullyShardedDataParallel
    flattened, detected as the package does) is for params sharded over processes (FSDP,
    ZeroRedundancyOptimizer): the step's sums are all-reduced over the default process group, so each process
    takes the step that one process would take over the whole model.

    Differences from the package: betas, decouple, use_bias_correction, d0 and growth_rate must agree
    across param groups (the package silently reads group 0); a state_dict of the package loads and continues its
    run (d0, which its groups lack, from this optimizer's); p.grad is never modified (the package adds
    L2 decay into it); the running numerator in the groups is the whole model's (the package keeps
    each process's share and all-reduces it). If sum ||s||_1 is zero
    (all gradients zero so far) the moments are updated and nothing else, as in the package. After the
    first counted step (with b2 > 0 and every layer scale > 0) the moments and the descent are one pass over
    memory: the descent uses only the moments and the step's dlr, so the numbers are the package's, except
    in a step where every entry of s cancels to exactly 0, which the package skips and this one has
    already taken (it warns; ``state`` and d are then as after the package's skipped step, p is not).
    As in the package, a group with lr 0 keeps its moments but, with ``decouple=True``, still takes the weight
    decay p (1 - wd dlr) at the shared dlr: give it weight_decay 0 to freeze it entirely.
    """

    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "eps": checks.positive,
                   "weight_decay": checks.nonnegative, "decouple": checks.boolean,
                   "use_bias_correction": checks.boolean, "d0": checks.positive, "growth_rate": growth_rate_check,
                   "layer_scale": checks.nonnegative, "log_every": checks.integer(0)}
    shared_options = ("betas", "decouple", "use_bias_correction", "d0", "growth_rate", "log_every")
    later_defaults = {"log_every": 0}
    package_group_gaps = ("d0",)
    fusable = True
    shardable = True

    def __init__(self, params, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, log_every=0, decouple=False,
                 use_bias_correction=False, d0=1e-6, growth_rate=math.inf, layer_scale=1.0, *, maximize=False,
                 **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, log_every=log_every, decouple=decouple,
                        use_bias_correction=use_bias_correction, d0=d0, growth_rate=growth_rate,
                        layer_scale=layer_scale, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"s": self.zeros_state(p), "exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}

    @staticmethod
    def moments(p, g, s, exp_avg, exp_avg_sq, *, beta1, beta2, sqrt_beta2, m_coef, s_coef, decay, eps, l2):
        """The first pass: <g, s / (sqrt(v) + eps)> with v and s before the step, then m, v and s updated, and
        ||s||_1 after; returned with the param-sized temporary it used."""
        if l2:
            g = mt.add(g, p, alpha=decay)
        denom = mt.sqrt(exp_avg_sq)
        mt.add_scalar_(denom, eps)
        mt.rdiv_(denom, s)  # s / (sqrt(v) + eps), over the temporary
        dots = mt.dots(g, denom)
        mt.mul_(exp_avg, beta1)
        mt.add_(exp_avg, g, m_coef)
        mt.mul_(exp_avg_sq, beta2)
        mt.addcmul_(exp_avg_sq, g, g, 1 - beta2)
        mt.mul_(s, sqrt_beta2)
        mt.add_(s, g, s_coef)
        mt.one_loop(denom, s)
        # Eager, |s| goes over the temporary the dot products are done with: a new model-sized temporary per step
        # page-faults in.
        return {"dot": dots, "l1": mt.l1_norms(s, scratch=denom)}, denom

    @staticmethod
    def descend(p, g, s, exp_avg, exp_avg_sq, *, decay_coef, step_coef, eps, decoupled, scratch=None):
        """The second pass: p <- p (1 - wd dlr) [decoupled], then p <- p - m / (sqrt(v) + eps) (step_coef -1; 0
        leaves finite p unchanged). Eager, sqrt(v) + eps is written over ``scratch`` if given."""
        denom = mt.sqrt(exp_avg_sq, out=scratch)
        mt.add_scalar_(denom, eps)
        if decoupled:
            mt.add_(p, p, decay_coef)
        mt.addcdiv_(p, exp_avg, denom, step_coef)

    @staticmethod
    def moments_descend(p, g, s, exp_avg, exp_avg_sq, *, beta1, beta2, sqrt_beta2, m_coef, s_coef, decay, eps,
                        decay_coef, step_coef, l2, decoupled):
        """Both passes in one: the descent uses dlr and the moments just updated, not this step's new d. With
        decay_coef and step_coef 0 (a step that may yet be skipped) it is the first pass alone."""
        sums, temporary = DAdaptAdam.moments(p, g, s, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2,
                                             sqrt_beta2=sqrt_beta2, m_coef=m_coef, s_coef=s_coef, decay=decay,
                                             eps=eps, l2=l2)
        DAdaptAdam.descend(p, g, s, exp_avg, exp_avg_sq, decay_coef=decay_coef, step_coef=step_coef, eps=eps,
                           decoupled=decoupled, scratch=temporary)
        return sums

    def global_step(self, work):
        g0 = self.param_groups[0]
        lr = self.shared_lr()
        beta1, beta2 = g0["betas"]
        k, d, nw = g0.get("k", 0), g0.get("d", g0["d0"]), g0.get("numerator_weighted", 0.0)
        decouple, growth_rate = g0["decouple"], g0["growth_rate"]
        bc = (1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1)) if g0["use_bias_correction"] else 1.0
        dlr = d * lr * bc
        sqrt_beta2 = beta2**0.5
        parts = self.parts(work)
        live = [part for part in parts if self.lr(part.group) > 0]
        # The descent needs nothing this step's reductions give, only whether sum ||s||_1 > 0 (else the package
        # skips it). After a counted step s has a nonzero entry; with sqrt(b2) > 0 and every layer scale > 0 the
        # sum can then only be 0 if every gradient entry cancels its s exactly: both passes run as one.
        mergeable = sqrt_beta2 > 0 and all(part.group["layer_scale"] > 0 for part in live)
        merged = k > 0 and mergeable
        acc, sk_l1 = 0.0, 0.0
        for part in live:
            group = part.group
            decay, r = group["weight_decay"], group["layer_scale"]
            scalars = dict(beta1=beta1, beta2=beta2, sqrt_beta2=sqrt_beta2, m_coef=r * dlr * (1 - beta1),
                           s_coef=dlr * (1 - sqrt_beta2), decay=decay, eps=group["eps"])
            # One kernel for every step (no compile after the first): unmerged, the descent's coefficients are 0.
            sums = self.run_pass(part, type(self).moments_descend,
                                 dict(scalars, decay_coef=-decay * dlr if merged else 0.0,
                                      step_coef=-1.0 if merged else 0.0),
                                 l2=decay != 0 and not decouple, decoupled=decay != 0 and decouple)
            acc += r * dlr * total(sums["dot"])
            sk_l1 += r * total(sums["l1"])
        acc, sk_l1 = self.global_sum([acc, sk_l1])
        nw = sqrt_beta2 * nw + (1 - sqrt_beta2) * acc
        if sk_l1 == 0:
            if merged:
                warnings.warn("DAdaptAdam: every entry of s cancelled to exactly 0 in this step, which the "
                              "authors' package skips; the step was already taken with the moments",
                              RuntimeWarning, stacklevel=3)
            return
        d_hat = d
        if lr > 0:
            d_hat = nw / ((1 - sqrt_beta2) * sk_l1)
            d = max(d, min(d_hat, d * growth_rate))
        if g0["log_every"] > 0 and k % g0["log_every"] == 0:
            _LOG.info("DAdaptAdam step %d: lr %g, dlr %g, d_hat %g, d %g, sk_l1 %.1e, numerator_weighted %.1e", k, lr,
                      dlr, d_hat, d, sk_l1, nw)
        for group in self.param_groups:
            group.update(numerator_weighted=nw, d=d, k=k + 1)
        for part in parts:
            is_live = any(part is x for x in live)
            if merged and is_live:
                continue
            decay = part.group["weight_decay"]
            self.run_pass(part, type(self).descend,
                          dict(decay_coef=-decay * dlr, step_coef=-1.0, eps=part.group["eps"]),
                          fuse=not (is_live and mergeable), decoupled=decay != 0 and decouple)
        self.count_step(parts)


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

    ``lr`` multiplies the adapted step (leave it at 1). ``log_every=n`` logs the D estimate every n steps
    (``logging``, INFO), as the package. Defaults: lr 1, momentum 0, weight_decay 0, log_every 0,
    d0 1e-6, growth_rate inf. State: s and x0 (2 words; x0 at the param's working precision whatever ``state_dtype``
    says); d, k, N and g0_norm live in every param group.

    After the first counted step the update of s and the average are one pass over memory (the average
    uses s, not this step's d): the package's numbers, except in a step where every entry of s cancels to
    exactly 0, which the package skips and this one has already taken (it warns).

    ``fsdp_in_use=True`` (the package's switch; on by itself for params that torch's FullyShardedDataParallel
    flattened, detected as the package does) is for params sharded over processes (FSDP,
    ZeroRedundancyOptimizer): the step's sums are all-reduced over the default process group, so each process
    takes the step that one process would take over the whole model.

    Differences from the package: z is not stored (it is x0 - s, recomputed: 2 words instead of 3);
    momentum, weight_decay, d0 and growth_rate must agree across groups (the package reads group 0);
    p.grad is never modified; a state_dict of the package loads and continues its run (its z dropped, the per-param
    step counts taken from k, d0 from this optimizer's group); the running numerator in the groups is the whole
    model's (the package keeps each process's share and all-reduces it). A first step whose gradients are all zero
    changes nothing and is not counted (the package divides by ||g_0|| = 0 there and raises ZeroDivisionError).
    As in the package, ||g_0|| leaves weight decay out (the package's ``grad.add`` there is not in place).
    """

    hyperparams = {"lr": checks.nonnegative, "momentum": checks.unit, "weight_decay": checks.nonnegative,
                   "d0": checks.positive, "growth_rate": growth_rate_check, "log_every": checks.integer(0)}
    shared_options = ("momentum", "weight_decay", "d0", "growth_rate", "log_every")
    later_defaults = {"log_every": 0}
    package_group_gaps = ("d0",)
    package_only_states = ("z",)
    loads_stepless_state = True
    fusable = True
    shardable = True

    def __init__(self, params, lr=1.0, momentum=0.0, weight_decay=0.0, log_every=0, d0=1e-6, growth_rate=math.inf,
                 *, maximize=False, **engine):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, log_every=log_every, d0=d0,
                        growth_rate=growth_rate, maximize=maximize)
        super().__init__(params, defaults, **engine)

    exact_states = ("x0",)

    def init_state(self, p, group):
        return {"s": self.zeros_state(p), "x0": self.copy_state(p)}

    @staticmethod
    def grad_norm(p, g, s, x0):
        """||g||^2 (without weight decay), for the first step's ||g_0||."""
        return {"sq": mt.squared_norms(g)}

    @staticmethod
    def accumulate(p, g, s, x0, *, decay, dlr, l2):
        """The first pass: <g, s> with s before the step, then s += dlr g, and ||s||^2 after."""
        if l2:
            g = mt.add(g, p, alpha=decay)
        # Compiled, the products are a value of their own so that mt.one_loop can tie their sum to the loop that
        # updates s; eager, a BLAS dot product needs no temporary.
        products = mt.mul(g, s) if mt.compiling() else None
        dots = mt.dots(g, s) if products is None else [mt.wide_sum(w) for w in products]
        mt.add_(s, g, dlr)
        if products is not None:
            mt.one_loop(products, s)
        return {"dot": dots, "sq": mt.squared_norms(s)}

    @staticmethod
    def average(p, g, s, x0, *, keep, ck):
        """The second pass: p <- keep p + ck (x0 - s), keep = 1 - ck (keep 1 and ck 0 leave finite p unchanged)."""
        z = mt.sub(x0, s)
        mt.mul_(p, keep)
        mt.add_(p, z, ck)

    @staticmethod
    def accumulate_average(p, g, s, x0, *, decay, dlr, keep, ck, l2):
        """Both passes in one: the average uses the s just updated, not this step's new d."""
        sums = DAdaptSGD.accumulate(p, g, s, x0, decay=decay, dlr=dlr, l2=l2)
        DAdaptSGD.average(p, g, s, x0, keep=keep, ck=ck)
        return sums

    def global_step(self, work):
        g0 = self.param_groups[0]
        lr = self.shared_lr()
        decay, momentum, growth_rate = g0["weight_decay"], g0["momentum"], g0["growth_rate"]
        ck = 1 - momentum
        k, d, nw = g0.get("k", 0), g0.get("d", g0["d0"]), g0.get("numerator_weighted", 0.0)
        parts = self.parts(work)
        live = [part for part in parts if self.lr(part.group) > 0]
        if k == 0:
            g0_sq = sum(total(self.run_pass(part, type(self).grad_norm, {}, fuse=False)["sq"]) for part in live)
            g0_norm = math.sqrt(self.global_sum([g0_sq])[0])
            if g0_norm == 0:
                return
        else:
            g0_norm = g0["g0_norm"]
        dlr = d * lr / g0_norm
        # As in DAdaptAdam: after a counted step s has a nonzero entry, so ||s|| can only be 0 if every gradient
        # entry cancels it exactly; from then on both passes run as one (one kernel for every step: unmerged, the
        # average keeps p).
        merged = k > 0
        delta, sk_sq = 0.0, 0.0
        for part in live:
            sums = self.run_pass(part, type(self).accumulate_average,
                                 dict(decay=decay, dlr=dlr, keep=1 - ck if merged else 1.0, ck=ck if merged else 0.0),
                                 l2=decay != 0)
            delta += dlr * total(sums["dot"])
            sk_sq += total(sums["sq"])
        delta, sk_sq = self.global_sum([delta, sk_sq])
        nw += delta
        if lr > 0:
            d_hat = 2 * nw / math.sqrt(sk_sq) if sk_sq > 0 else d
            d = max(d, min(d_hat, d * growth_rate))
        if sk_sq == 0:
            if merged:
                warnings.warn("DAdaptSGD: every entry of s cancelled to exactly 0 in this step, which the "
                              "authors' package skips; the step was already taken with s", RuntimeWarning,
                              stacklevel=3)
            return
        if g0["log_every"] > 0 and k % g0["log_every"] == 0:
            _LOG.info("DAdaptSGD step %d: dlr %g, d %g, sk_norm %g, numerator_weighted %g, g0_norm %g", k, dlr, d,
                      math.sqrt(sk_sq), nw, g0_norm)
        for group in self.param_groups:
            group.update(numerator_weighted=nw, d=d, g0_norm=g0_norm, k=k + 1)
        for part in parts:
            if merged and any(part is x for x in live):
                continue
            self.run_pass(part, type(self).average, dict(keep=1 - ck, ck=ck), fuse=not any(part is x for x in live))
        self.count_step(parts)
