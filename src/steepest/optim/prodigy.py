"""Prodigy: Adam with a D-Adaptation step size that grows faster (Mishchenko & Defazio 2023)."""

from __future__ import annotations

import math

from ..core import checks
from ..core import multitensor as mt
from ..core.global_step import GlobalStepOptimizer, growth_rate_check, total
from ..core.registry import register

_SKIP = {
    "param_groups": "D is estimated jointly over all param groups, so one optimizer over two groups is not two "
                    "optimizers; groups share one lr (or 0), as in the authors' code",
    "fp16_tracking": "float16 params round to nearest (no stochastic rounding to float16): the first steps of d0 lr "
                     "stay below half a spacing, the params and d do not move, as the package's (see the docstring)",
}


def _beta3_check(name, value):
    if value is not None:
        checks.unit(name, value)


_beta3_check.bad_example = 1.5


@register("prodigy", family="parameter-free",
          paper="Mishchenko & Defazio 2023, Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
          arxiv="2306.06101", reference="prodigyopt 1.1.2 (Prodigy)", state_words=4,
          reread_words=3,  # p, m, v: the descent's denominator holds this step's new d
          example_kwargs={"lr": 1.0, "weight_decay": 1e-2}, conformance_skip=_SKIP,
          search_space={"lr": ("log", 0.3, 3.0), "weight_decay": ("log", 1e-4, 0.1)})
class Prodigy(GlobalStepOptimizer):
    """Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
    arXiv 2306.06101), as the authors' package ``prodigyopt`` 1.1.2.

    With dlr = d lr bc (bc = sqrt(1-b2^(k+1))/(1-b1^(k+1)) if ``use_bias_correction``, else 1),
    b3 = sqrt(b2) unless given, and per step k over all tensors (g includes L2 decay if not ``decouple``):

        r  = b3 r + (d/d0) dlr <g, p0 - p>
        m  = b1 m + d (1-b1) g;   v = b2 v + d^2 (1-b2) g^2
        s  = b3 s + (d/d0) c g,   c = d (``safeguard_warmup``) or dlr
        d_hat = d_coef r / sum ||s||_1;   d_max = max(d_max, d_hat);   d = min(d_max, d growth_rate)
                (at the first growth, while d = d0: d = max(d, d_hat) first)
        p <- p (1 - wd dlr) [decouple];   p <- p - dlr m / (sqrt(v) + d eps)   (b1 = 0: d g in place of m)

    ``lr`` multiplies the adapted step (leave it at 1). Defaults (the package's): lr 1,
    betas (0.9, 0.999), beta3 None, eps 1e-8, weight_decay 0, decouple True, use_bias_correction False,
    safeguard_warmup False, d0 1e-6, d_coef 1, growth_rate inf, slice_p 1. State: s, p0, exp_avg, exp_avg_sq
    (4 words; 3 with b1 = 0; p0 at the param's working precision whatever ``state_dtype`` says); d, d_max, d_hat,
    d_numerator, d_denom and k live in every param group
    (``group["d"]`` is the current D estimate).

    ``fsdp_in_use=True`` (the package's switch; on by itself for params that torch's FullyShardedDataParallel
    flattened, detected as the package does) is for params sharded over processes (FSDP,
    ZeroRedundancyOptimizer): the step's sums are all-reduced over the default process group, so each process
    takes the step that one process would take over the whole model.

    ``slice_p=k`` (the package's memory saver) keeps s and p0 over every k-th entry of each flattened param
    (k = 11: 2/11 of a word instead of 2) and takes the dot product and ||s||_1 over those entries, as the package
    does; fixed for the run, and those params' passes run eager (the fused kernels take param-sized states).

    Differences from the package: p0 is always a copy (the package stores a scalar 0 for an all-zero tensor: the
    same numbers); betas, beta3, decouple, use_bias_correction, d0, d_coef and growth_rate must agree across groups
    (the package reads group 0); p.grad is never modified; a state_dict of the package loads (its flattened s and
    p0 in the param's shape) and continues its run. If
    sum ||s||_1 is zero the moments are updated and nothing else, as in the package. As in the package, a group
    with lr 0 keeps its moments but, with ``decouple=True`` (the default), still takes the weight decay
    p (1 - wd dlr) at the shared dlr: give it weight_decay 0 to freeze it entirely.

    bfloat16 params are written back with stochastic rounding unless ``stochastic_rounding=False``: rounded to
    nearest (as the package's bfloat16 arithmetic does), the first steps of about d0 lr = 1e-6 are below half a
    bfloat16 spacing of all weights but those near 0, so <g, p0 - p> and with it d grow late or never (the
    package's d stays 1e-6 over 30 steps of a problem whose float32 run reaches d = 0.35; a small MLP after 60
    steps: loss 1.35 for the package in bfloat16, 1.28 rounded to nearest here, 0.0011 in float32). Rounded
    stochastically, p is right in expectation and so is the numerator, linear in p (d 0.34 and loss 0.0012
    there). float16 params have no stochastic rounding (building the optimizer over them warns): keep float32
    params (autocast the forward) instead.
    """

    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "beta3": _beta3_check,
                   "eps": checks.positive, "weight_decay": checks.nonnegative, "decouple": checks.boolean,
                   "use_bias_correction": checks.boolean, "safeguard_warmup": checks.boolean,
                   "d0": checks.positive, "d_coef": checks.positive, "growth_rate": growth_rate_check,
                   "slice_p": checks.integer(1)}
    shared_options = ("betas", "beta3", "decouple", "use_bias_correction", "d0", "d_coef", "growth_rate")
    fusable = True
    shardable = True
    stochastic_rounding_default = True

    def __init__(self, params, lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0, decouple=True,
                 use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0, growth_rate=math.inf,
                 slice_p=1, *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, beta3=beta3, eps=eps,
                        weight_decay=weight_decay, decouple=decouple, use_bias_correction=use_bias_correction,
                        safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef, growth_rate=growth_rate,
                        slice_p=slice_p, maximize=maximize)
        super().__init__(params, defaults, **engine)

    exact_states = ("p0",)

    later_defaults = {"slice_p": 1}
    flat_states = ("s", "p0")

    def _collect(self):
        work = super()._collect()
        for group, params in work:
            if group["slice_p"] > 1 and not all(mt.plain(p) for p in params):
                raise TypeError("Prodigy: slice_p > 1 takes every k-th entry of the flattened param, which a DTensor "
                                "param (FSDP2, tensor parallelism) cannot give; use slice_p=1 with such params")
        return work

    optional_states = {"exp_avg": lambda group: group["betas"][0] > 0}

    def init_state(self, p, group):
        # slice_p > 1: s and p0 over every slice_p-th entry of the flattened param, as the package's.
        sliced = p if group["slice_p"] == 1 else p.detach().reshape(-1)[::group["slice_p"]]
        state = {"s": self.zeros_state(sliced), "p0": self.copy_state(sliced)}
        if group["betas"][0] > 0:
            state["exp_avg"] = self.zeros_state(p)
        state["exp_avg_sq"] = self.zeros_state(p)
        return state

    @staticmethod
    def moments(p, g, s, p0, exp_avg_sq, exp_avg=None, *, beta1, beta2, beta3, m_coef, v_coef, s_coef, decay, l2,
                slice_p=1):
        """The first pass: <g, p0 - p>, then m, v and s updated, and ||s||_1 after (the dot product and s over every
        slice_p-th entry)."""
        if l2:
            g = mt.add(g, p, alpha=decay)
        if slice_p > 1:
            # s keeps a complex param's (real, imaginary) pairs as rows: slice whole entries, as the package does.
            g_s = [x.reshape(-1, *z.shape[1:])[::slice_p] for x, z in zip(g, s)]
            p_s = [x.reshape(-1, *z.shape[1:])[::slice_p] for x, z in zip(p, s)]
        else:
            g_s, p_s = g, p
        dots = mt.dots(g_s, mt.sub(p0, p_s))
        if exp_avg is not None:
            mt.mul_(exp_avg, beta1)
            mt.add_(exp_avg, g, m_coef)
        mt.mul_(exp_avg_sq, beta2)
        mt.addcmul_(exp_avg_sq, g, g, v_coef)
        mt.mul_(s, beta3)
        mt.add_(s, g_s, s_coef)
        return {"dot": dots, "l1": mt.l1_norms(s)}

    @staticmethod
    def descend(p, g, s, p0, exp_avg_sq, exp_avg=None, *, d_eps, decay, decay_coef, step_coef, l2, decoupled):
        """The second pass: p <- p (1 - wd dlr) [decoupled], then p <- p + step_coef m / (sqrt(v) + d eps)
        (g in place of m when b1 = 0)."""
        denom = mt.sqrt(exp_avg_sq)
        mt.add_scalar_(denom, d_eps)
        if decoupled:
            mt.add_(p, p, decay_coef)
        if exp_avg is not None:
            mt.addcdiv_(p, exp_avg, denom, step_coef)
        else:
            if l2:
                g = mt.add(g, p, alpha=decay)
            mt.addcdiv_(p, g, denom, step_coef)

    def global_step(self, work):
        g0 = self.param_groups[0]
        lr = self.shared_lr()
        beta1, beta2 = g0["betas"]
        beta3 = g0["beta3"] if g0["beta3"] is not None else math.sqrt(beta2)
        d0, d_coef, growth_rate, decouple = g0["d0"], g0["d_coef"], g0["growth_rate"], g0["decouple"]
        k, d, d_max = g0.get("k", 0), g0.get("d", d0), g0.get("d_max", d0)
        bc = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1)) if g0["use_bias_correction"] else 1.0
        dlr = d * lr * bc
        d_numerator = g0.get("d_numerator", 0.0) * beta3
        parts = self.parts(work)
        delta, d_denom = 0.0, 0.0
        for part in parts:
            decay = part.group["weight_decay"]
            if self.lr(part.group) == 0:
                continue
            s_coef = (d / d0) * d if part.group["safeguard_warmup"] else (d / d0) * dlr
            sums = self.run_pass(part, type(self).moments,
                                 dict(beta1=beta1, beta2=beta2, beta3=beta3, m_coef=d * (1 - beta1),
                                      v_coef=d * d * (1 - beta2), s_coef=s_coef, decay=decay),
                                 l2=decay != 0 and not decouple, fuse=part.group["slice_p"] == 1,
                                 slice_p=part.group["slice_p"])
            delta += (d / d0) * dlr * total(sums["dot"])
            d_denom += total(sums["l1"])
        delta, d_denom = self.global_sum([delta, d_denom])
        if d_denom == 0:
            return
        d_hat = d
        if lr > 0:
            d_numerator = d_numerator + delta
            d_hat = d_coef * d_numerator / d_denom
            if d == d0:
                d = max(d, d_hat)
            d_max = max(d_max, d_hat)
            d = min(d_max, d * growth_rate)
        for group in self.param_groups:
            group.update(d_numerator=d_numerator, d_denom=d_denom, d=d, d_max=d_max, d_hat=d_hat, k=k + 1)
        for part in reversed(parts):  # from the tensors the moments' pass read last, still in the cache
            decay = part.group["weight_decay"]
            self.run_pass(part, type(self).descend,
                          dict(d_eps=d * part.group["eps"], decay=decay, decay_coef=-decay * dlr,
                               step_coef=-dlr if beta1 > 0 else -dlr * d),
                          l2=decay != 0 and not decouple, decoupled=decay != 0 and decouple,
                          reverse=True, fuse=part.group["slice_p"] == 1)
        self.count_step(parts)
