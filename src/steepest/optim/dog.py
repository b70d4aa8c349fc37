"""DoG and LDoG: SGD with the step size distance-over-gradients (Ivgi, Hinder & Carmon 2023)."""

from __future__ import annotations

import math

import torch

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.global_step import GlobalStepOptimizer, total
from ..core.precision import working_dtype
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
          state_words=1, example_kwargs={"lr": 1.0}, reread_words=2,  # x and g: norms, then x <- x - eta g
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
    init_eta None. State: x0 (1 word, at the param's working precision whatever ``state_dtype`` says: distances
    from a bfloat16 copy would start at its rounding error); rbar, G and eta live in the param group
    (``group["eta"]``).

    Differences from the authors' code: the norms run over the params that have a gradient (the
    authors' code requires every param of the group to have one); a group's first step is its own first
    step (the authors' is the optimizer's first); p.grad is never modified; rbar and G are Python
    floats (float64) in the group rather than tensors; G = 0 (eps = 0 and zero gradients) gives
    eta = 0 where the authors' code asserts. The paper's averaged iterate is not kept (steepest.averaging keeps
    one). ``fsdp_in_use=True`` (not in the authors' code) is for params sharded over processes (FSDP,
    ZeroRedundancyOptimizer): the norms are all-reduced over the default process group, so every process takes
    the step one process would take over the whole group.

    bfloat16 params are written back with stochastic rounding unless ``stochastic_rounding=False``: rounded to
    nearest, steps of eta ~ reps_rel |x| are below half a bfloat16 spacing, the params never move, the distance
    stays 0 and the step size keeps its first value (a small MLP's loss is unchanged after 300 steps). Rounded
    stochastically, the params are right in expectation and the distance also counts the rounding noise (about the
    square root of the entries moved, in spacings), which acts as a larger reps_rel at the start (that MLP after 300
    steps: 0.014 in bfloat16, 0.050 in float32). float16 params have no stochastic rounding (building the optimizer
    over them warns): keep float32 params (autocast the forward) instead.
    """

    hyperparams = _HYPER
    exact_states = ("x0",)
    stochastic_rounding_default = True

    def __init__(self, params, lr=1.0, reps_rel=1e-6, weight_decay=0.0, eps=1e-8, init_eta=None, *, maximize=False,
                 **engine):
        defaults = dict(lr=lr, reps_rel=reps_rel, weight_decay=weight_decay, eps=eps, init_eta=init_eta,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"x0": self.copy_state(p)}

    fusable = True
    shardable = True

    @staticmethod
    def initial_norm(p, g, x0):
        """||x0||^2, for a group's first rbar: a pass of its own, eager, taken once."""
        return {"x0_sq": mt.squared_norms(x0)}

    @staticmethod
    def norms(p, g, x0, *, decay, l2):
        """The first pass: ||g||^2 (g with L2 decay) and ||x - x0||^2, reduced in one loop."""
        if l2:
            g = mt.add(g, p, alpha=decay)
        distance = mt.sub(p, x0)
        mt.one_loop(g, distance)
        return {"g_sq": mt.squared_norms(g), "r_sq": mt.squared_norms(distance)}

    @staticmethod
    def descend(p, g, x0, *, decay, eta, l2):
        """The second pass: x <- x - eta g (g with L2 decay)."""
        if l2:
            g = mt.add(g, p, alpha=decay)
        mt.add_(p, g, -eta)

    def global_step(self, work):
        by_group: dict[int, list] = {}
        parts = self.parts(work)
        for part in parts:
            by_group.setdefault(id(part.group), []).append(part)
        for group_parts in by_group.values():
            self._group_step(group_parts[0].group, group_parts)
        self.count_step(parts)

    def _norms(self, group, part):
        decay = group["weight_decay"]
        return self.run_pass(part, type(self).norms, dict(decay=decay), l2=decay != 0)

    def _descend(self, group, part, eta):
        decay = group["weight_decay"]
        self.run_pass(part, type(self).descend, dict(decay=decay, eta=eta), l2=decay != 0,
                      reverse=True)

    def _group_step(self, group, parts):
        first = "rbar" not in group
        reps_rel = 0.0 if group["init_eta"] is not None else group["reps_rel"]
        sums = [self._norms(group, part) for part in parts]
        if first:
            x0_sq = sum(total(self.run_pass(part, type(self).initial_norm, {}, fuse=False)["x0_sq"])
                        for part in parts)
            g_sq, x0_sq = self.global_sum([sum(total(x["g_sq"]) for x in sums), x0_sq])
            rbar = reps_rel * (1 + math.sqrt(x0_sq))
            G = g_sq + group["eps"]
        else:
            g_sq, r_sq = self.global_sum([sum(total(x[k]) for x in sums) for k in ("g_sq", "r_sq")])
            rbar = max(group["rbar"], math.sqrt(r_sq))
            G = group["G"] + g_sq
        eta = self.lr(group) * rbar / math.sqrt(G) if G > 0 else 0.0
        if first and group["init_eta"] is not None:
            eta = group["init_eta"]
        group.update(rbar=rbar, G=G, eta=eta)
        for part in reversed(parts):  # from the tensors the norms' pass read last, still in the cache
            self._descend(group, part, eta)


def ldog_update(params, grads, x0, rbar, G, eta, *, lr, eps, reps_rel, decay, first, init_eta, l2=False,
                fixed_first_eta=False):
    """One LDoG step, each tensor its own block: rbar <- max(rbar, ||x - x0||), G <- G + ||g||^2,
    eta = lr rbar / sqrt(G) (0 where G = 0), x <- x - eta g; at a first step (``first`` = 1) rbar =
    reps_rel (1 + ||x0||) and G = eps + ||g||^2, and eta = init_eta with ``fixed_first_eta``. g includes L2 decay.

    rbar, G and eta are one-element tensors per param; their arithmetic runs on the stacked vectors (a few
    small ops per step, not a few per tensor)."""
    if l2:
        grads = mt.add(grads, params, alpha=decay)
    g_sq = torch.stack(mt.squared_norms(grads))
    rbar_all, G_all = torch.cat(list(rbar)), torch.cat(list(G))
    # Compiled, ``first`` is a tensor (one kernel for every step) and one norm serves both steps: of x0 at a
    # first step, of x - x0 later, selected per element in the loop that reads x and x0 anyway; eager, a first
    # step takes ||x0|| and a later one ||x - x0||.
    if mt.compiling():
        is_first = first > 0
        reach = [torch.where(is_first, x_init, x - x_init) for x, x_init in zip(params, x0)]
        mt.one_loop(grads, reach)
        reach_norm = torch.stack(mt.norms(reach))
        rbar_all = torch.where(is_first, reps_rel * (1.0 + reach_norm), torch.maximum(rbar_all, reach_norm))
        G_all = torch.where(is_first, torch.zeros_like(G_all) + eps, G_all) + g_sq
    elif first:
        rbar_all = reps_rel * (1.0 + torch.stack(mt.norms(x0)))
        G_all = g_sq + eps
    else:
        rbar_all = torch.maximum(rbar_all, torch.stack(mt.norms(mt.sub(params, x0))))
        G_all = G_all + g_sq
    positive = G_all > 0
    eta_all = torch.where(positive, lr * rbar_all / torch.where(positive, G_all, 1.0).sqrt(), 0.0)
    if fixed_first_eta and mt.compiling():
        eta_all = torch.where(first > 0, torch.zeros_like(eta_all) + init_eta, eta_all)
    elif fixed_first_eta and first:
        eta_all = torch.full_like(eta_all, init_eta)
    # Compiled, eta is computed once into a buffer, not again (a root, a division, selects) for every vector of the
    # tensor's loop.
    eta_all = mt.realize(eta_all)
    mt.copy_(rbar, list(rbar_all.split(1)))
    mt.copy_(G, list(G_all.split(1)))
    mt.copy_(eta, list(eta_all.split(1)))
    for x, g, e in zip(params, grads, eta_all):
        # The one-number step broadcasts inside addcmul_ (no gradient-sized temporary for eta g).
        x.addcmul_(g, e, value=-1.0)


@register("ldog", family="parameter-free",
          paper="Ivgi, Hinder & Carmon 2023, DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule",
          arxiv="2302.12022", reference="carmonlab/dog (LDoG), NumPy transcription in the test", state_words=1,
          example_kwargs={"lr": 1.0}, reread_words=2)  # x and g: the tensor's norms, then x <- x - eta g
class LDoG(Optimizer):
    """LDoG, layer-wise DoG (Ivgi, Hinder & Carmon 2023, arXiv 2302.12022, section 4): the step size of
    :class:`DoG` computed for each tensor separately,

        rbar_0 = reps_rel (1 + ||x_0||);  rbar_t = max(rbar_{t-1}, ||x_t - x_0||);
        G_t = eps + sum_i ||g_i||^2;  x_{t+1} = x_t - lr rbar_t / sqrt(G_t) g_t     (norms of that tensor)

    Same options, defaults and differences as :class:`DoG`; a tensor's first step is its own first step.
    Since nothing couples two tensors, a step is one pass over each tensor (its norms, then its update; one
    fused kernel per tensor), with no host synchronisation. State: x0 (1 word), and ``rbar``, ``G`` and ``eta``
    of the tensor as one-element tensors in the param's working dtype (float32 for 16-bit params; never the
    16-bit ``state_dtype``: G is a growing sum). bfloat16 params round stochastically by default, as
    :class:`DoG`'s do (its docstring says why).
    """

    hyperparams = _HYPER
    exact_states = ("x0",)
    stochastic_rounding_default = True
    weight_decay_mode = "custom"
    elementwise = False
    whole_tensor_reductions = True
    update = staticmethod(ldog_update)

    def __init__(self, params, lr=1.0, reps_rel=1e-6, weight_decay=0.0, eps=1e-8, init_eta=None, *, maximize=False,
                 **engine):
        defaults = dict(lr=lr, reps_rel=reps_rel, weight_decay=weight_decay, eps=eps, init_eta=init_eta,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        dtype = working_dtype(p.dtype) if p.is_floating_point() else p.real.dtype
        # Shape (1,), not 0-dim: torch.compile (2.13) drops in-place writes to 0-dim tensor inputs.
        sums = {k: torch.zeros(1, dtype=dtype, device=p.device) for k in ("rbar", "G", "eta")}
        return {"x0": self.copy_state(p), **sums}

    def scalars(self, group, step):
        fixed = group["init_eta"] is not None
        return dict(lr=self.lr(group), eps=group["eps"], reps_rel=0.0 if fixed else group["reps_rel"],
                    decay=group["weight_decay"], first=1.0 if step == 1 else 0.0,
                    init_eta=float(group["init_eta"]) if fixed else 0.0)

    def static_options(self, group):
        return {"l2": group["weight_decay"] != 0, "fixed_first_eta": group["init_eta"] is not None}
