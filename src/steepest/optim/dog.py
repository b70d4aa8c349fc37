"""DoG and LDoG: SGD with the step size distance-over-gradients (Ivgi, Hinder & Carmon 2023)."""

from __future__ import annotations

import math

import torch

from ..core import checks
from ..core import multitensor as mt
from ..core.global_step import GlobalStepOptimizer, sq_norms, total
from ..core.registry import register


def _init_eta_check(name, value):
    if value is not None:
        checks.positive(name, value)


_init_eta_check.bad_example = -1.0

_HYPER = {"lr": checks.nonnegative, "reps_rel": checks.nonnegative, "weight_decay": checks.nonnegative,
          "eps": checks.nonnegative, "init_eta": _init_eta_check}


@register("dog", family="parameter-free",
          paper="Ivgi, Hinder & Carmon 2023, DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule",
          arxiv="2302.12022", reference="carmonlab/dog (dog-optimizer 1.0.2), NumPy transcription in the test",
          state_words=1, example_kwargs={"lr": 1.0},
          conformance_skip={"compile": "the step size reduces over all tensors of a group (distance and gradient "
                                       "norms) before any update: it runs the eager for-each path only"},
          search_space={"lr": ("log", 0.3, 3.0), "reps_rel": ("log", 1e-8, 1e-3)})
class DoG(GlobalStepOptimizer):
    """DoG, Distance over Gradients (Ivgi, Hinder & Carmon 2023, "DoG is SGD's Best Friend: A
    Parameter-Free Dynamic Step Size Schedule", arXiv 2302.12022), as the authors' code (carmonlab/dog,
    package dog-optimizer 1.0.2). Per param group, treating its tensors as one vector:

        rbar_0 = reps_rel (1 + ||x_0||);   rbar_t = max(rbar_{t-1}, ||x_t - x_0||)
        G_t = eps + sum_{i<=t} ||g_i||^2;   eta_t = lr rbar_t / sqrt(G_t);   x_{t+1} = x_t - eta_t g_t

    where g includes L2 weight decay (g <- g + wd x). ``init_eta`` sets the first step size instead of
    ``reps_rel`` (then rbar_0 = 0). Defaults (the authors'): lr 1 (the paper's c; leave it), reps_rel
    1e-6 (1e-4 for models with batch normalization, the authors advise), weight_decay 0, eps 1e-8,
    init_eta None. State: x0 (1 word); rbar, G and eta live in the param group (``group["eta"]``).

    Differences from the authors' code: the norms run over the params that have a gradient (the
    authors' code requires every param of the group to have one); a group's first step is its own first
    step (the authors' is the optimizer's first); p.grad is never modified; rbar and G are Python
    floats (float64) in the group rather than tensors; G = 0 (eps = 0 and zero gradients) gives
    eta = 0 where the authors' code asserts. The paper's averaged iterate is not kept (use
    steepest.averaging when it lands).
    """

    hyperparams = _HYPER

    def __init__(self, params, lr=1.0, reps_rel=1e-6, weight_decay=0.0, eps=1e-8, init_eta=None, *, maximize=False,
                 **engine):
        defaults = dict(lr=lr, reps_rel=reps_rel, weight_decay=weight_decay, eps=eps, init_eta=init_eta,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"x0": self.copy_state(p)}

    def global_step(self, work):
        buckets = self.buckets(work)
        by_group: dict[int, list] = {}
        for b in buckets:
            decay = b.group["weight_decay"]
            if decay != 0:
                b.g = mt.add(b.g, b.p, alpha=decay)
            by_group.setdefault(id(b.group), []).append(b)
        for bs in by_group.values():
            self._group_step(bs[0].group, bs)
        for b in buckets:
            b.write_back()
        self.count_step(buckets)

    def _group_step(self, group, bs):
        first = "rbar" not in group
        reps_rel = 0.0 if group["init_eta"] is not None else group["reps_rel"]
        g_sq = sum(total(sq_norms(b.g)) for b in bs)
        if first:
            rbar = reps_rel * (1 + math.sqrt(sum(total(sq_norms(b.s["x0"])) for b in bs)))
            G = g_sq + group["eps"]
        else:
            dist = math.sqrt(sum(total(sq_norms(mt.sub(b.p, b.s["x0"]))) for b in bs))
            rbar = max(group["rbar"], dist)
            G = group["G"] + g_sq
        eta = self.lr(group) * rbar / math.sqrt(G) if G > 0 else 0.0
        if first and group["init_eta"] is not None:
            eta = group["init_eta"]
        group.update(rbar=rbar, G=G, eta=eta)
        for b in bs:
            mt.add_(b.p, b.g, -eta)


@register("ldog", family="parameter-free",
          paper="Ivgi, Hinder & Carmon 2023, DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule",
          arxiv="2302.12022", reference="carmonlab/dog (LDoG), NumPy transcription in the test", state_words=1,
          example_kwargs={"lr": 1.0},
          conformance_skip={"compile": "each tensor's step size reduces over the tensor (distance and gradient "
                                       "norms) first: it runs the eager for-each path only"})
class LDoG(DoG):
    """LDoG, layer-wise DoG (Ivgi, Hinder & Carmon 2023, arXiv 2302.12022, section 4): the step size of
    :class:`DoG` computed for each tensor separately,

        rbar_0 = reps_rel (1 + ||x_0||);  rbar_t = max(rbar_{t-1}, ||x_t - x_0||);
        G_t = eps + sum_i ||g_i||^2;  x_{t+1} = x_t - lr rbar_t / sqrt(G_t) g_t     (norms of that tensor)

    Same options, defaults and differences as :class:`DoG`. State: x0 (1 word); the per-tensor rbar, G
    and eta are lists in the param group, in the order of ``group["params"]`` (None before a tensor's
    first step).
    """

    per_tensor = True

    def _group_step(self, group, bs):
        n = len(group["params"])
        for key in ("rbar", "G", "eta"):
            if not isinstance(group.get(key), list) or len(group[key]) != n:
                group[key] = [None] * n
        index = {id(p): i for i, p in enumerate(group["params"])}
        reps_rel = 0.0 if group["init_eta"] is not None else group["reps_rel"]
        lr = self.lr(group)
        for b in bs:
            g_sq = [float(x) for x in torch.stack(sq_norms(b.g)).double()] if b.g else []
            first = [group["rbar"][index[id(p)]] is None for p in b.params]
            x0_norm = [math.sqrt(float(x)) for x in torch.stack(sq_norms(b.s["x0"])).double()]
            dist = [math.sqrt(float(x)) for x in torch.stack(sq_norms(mt.sub(b.p, b.s["x0"]))).double()]
            etas = []
            for j, p in enumerate(b.params):
                i = index[id(p)]
                if first[j]:
                    rbar, G = reps_rel * (1 + x0_norm[j]), g_sq[j] + group["eps"]
                else:
                    rbar, G = max(group["rbar"][i], dist[j]), group["G"][i] + g_sq[j]
                eta = lr * rbar / math.sqrt(G) if G > 0 else 0.0
                if first[j] and group["init_eta"] is not None:
                    eta = group["init_eta"]
                group["rbar"][i], group["G"][i], group["eta"][i] = rbar, G, eta
                etas.append(eta)
            for p, g, eta in zip(b.p, b.g, etas):
                p.add_(g, alpha=-eta)
