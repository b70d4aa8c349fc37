"""Generalized Polyak step size with momentum: ALR-SMAG (Wang, Johansson & Zhang 2023)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core import checks
from ..core import multitensor as mt
from ..core.global_step import GlobalStepOptimizer, total
from ..core.registry import register

# Options that the single, global step size depends on: every param group must agree on them.
_GLOBAL = ("f_star", "c", "maximize")


@register("alr_smag", family="first-order",
          paper="Wang, Johansson & Zhang 2023, Generalized Polyak Step Size for First Order Optimization with "
                "Momentum", arxiv="2305.12939",
          reference="paper equations (NumPy transcription in tests/optim/test_polyak.py); cf. Schaipp's "
                    "step-back AlrSmag", state_words=1, reread_words=1,  # d: ||d||^2, then x <- x - eta d
          needs=("closure",), example_kwargs={"lr": 0.1, "momentum": 0.9},
          search_space={"lr": ("log", 1e-2, 10.0), "one_minus_momentum": ("log", 1e-2, 0.5),
                        "c": ("log", 0.2, 5.0)})
class ALRSMAG(GlobalStepOptimizer):
    """ALR-SMAG: stochastic momentum (moving-averaged gradient) with a generalized Polyak step size
    (Wang, Johansson & Zhang, "Generalized Polyak Step Size for First Order Optimization with Momentum",
    ICML 2023, arXiv 2305.12939).

        d_k = momentum d_{k-1} + g_k        (d_{-1} = 0; all parameters together)
        eta_k = min( [f(x_k) - f_star]_+ / (c ||d_k||^2),  lr )
        x_{k+1} = x_k - eta_k d_k

    The step size is Polyak's (f - f*)/||g||^2 with the momentum direction d in place of the gradient:
    bounding ||x_{k+1} - x*||^2 with convexity, the momentum's memory term cancels when the previous
    step took the same rule. It is one number for all parameters (the norm runs over every tensor of
    every group), so ``step`` needs a closure returning the (mini-batch) loss f(x_k), and ``f_star`` is
    a lower bound of that loss (0 for non-negative losses that can be interpolated, the default).
    ``lr`` is the cap eta_max of the stochastic variant: the step never exceeds it, so ``lr`` scales the
    step only while the cap is active. ``c`` (default 1) divides the Polyak ratio (the paper's c).

    With ``maximize=True`` the objective is maximized and f_star is its largest value: the gap is
    f_star - f. ``weight_decay`` (default 0; not in the paper) is decoupled and scaled by the adaptive
    step: x <- x (1 - eta_k wd), as in Schaipp's step-back implementation. f_star, c and maximize
    must be the same in every param group; lr, momentum and weight_decay may differ.
    Deliberate differences: the gap is clipped at 0 (a loss below f_star gives no step instead of an
    ascent step), and when d_k = 0 the step is lr (or 0 when the gap is 0) instead of 0/0.
    After each step ``last_step_sizes`` holds eta_k of every param group. ``fsdp_in_use=True`` is for params
    sharded over processes (FSDP, ZeroRedundancyOptimizer): ||d||^2 is all-reduced over the default process
    group (the closure's loss must be the whole model's, as FSDP's is).
    State: momentum_buffer d (1 word). Two passes over memory with ||d||^2 between them: each runs eager or
    compiled (the first kernel returns its tensors' squared norms), as ``compile`` says.
    """

    hyperparams = {"lr": checks.nonnegative, "momentum": checks.unit, "f_star": checks.real(),
                   "c": checks.positive, "weight_decay": checks.nonnegative}
    needs_closure = True
    fusable = True
    shardable = True

    def __init__(self, params, lr=1.0, momentum=0.9, f_star=0.0, c=1.0, weight_decay=0.0, *, maximize=False,
                 **engine):
        defaults = dict(lr=lr, momentum=momentum, f_star=f_star, c=c, weight_decay=weight_decay, maximize=maximize)
        self.last_step_sizes: list[float] = []
        super().__init__(params, defaults, **engine)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups and isinstance(param_group, dict):
            first = self.param_groups[0]
            for key in _GLOBAL:
                value = param_group.get(key, self.defaults.get(key))
                if value != first[key]:
                    raise ValueError(f"ALRSMAG: {key} must be the same in every param group (the step size is "
                                     f"global): group 0 has {first[key]!r}, the new group {value!r}")
        super().add_param_group(param_group)

    def init_state(self, p, group):
        return {"momentum_buffer": self.zeros_state(p)}

    @staticmethod
    def accumulate(p, g, momentum_buffer, *, momentum):
        """The first pass: d <- momentum d + g, and ||d||^2."""
        mt.mul_(momentum_buffer, momentum)
        mt.add_(momentum_buffer, g)
        return {"sq": mt.squared_norms(momentum_buffer)}

    @staticmethod
    def descend(p, g, momentum_buffer, *, eta, decay_factor, decayed):
        """The second pass: x <- x (1 - eta wd) - eta d."""
        if decayed:
            mt.mul_(p, decay_factor)
        mt.add_(p, momentum_buffer, -eta)

    @torch.no_grad()
    def step(self, closure=None):
        """One step; ``closure`` must re-evaluate the model, call backward and return the loss."""
        if closure is None:
            raise ValueError("ALRSMAG.step needs a closure that re-evaluates the model and returns the loss "
                             "(step(closure)): the Polyak step size divides the loss gap f - f_star")
        loss = self.call_closure(closure)
        work = self._collect()
        if not work:
            return loss
        if loss is None:
            raise ValueError("ALRSMAG: the closure returned None; it must return the loss f(x_k)")
        loss_value = float(loss)
        if self.skip_nonfinite and (not math.isfinite(loss_value) or not self._grads_finite(work)):
            self.skipped_steps += 1
            return loss

        parts = self.parts(work)
        self.count_step(parts)
        sq = sum(total(self.run_pass(part, type(self).accumulate, dict(momentum=part.group["momentum"]))["sq"])
                 for part in parts)
        sq = self.global_sum([sq])[0]

        first = self.param_groups[0]
        gap = (first["f_star"] - loss_value) if first["maximize"] else (loss_value - first["f_star"])
        gap = max(gap, 0.0) if not math.isnan(gap) else gap
        if sq > 0:
            ratio = gap / (first["c"] * sq)
        else:
            ratio = math.inf if gap > 0 else (0.0 if gap == 0 else gap)

        # eta = min(ratio, lr) per group.
        etas = {}
        for group, _ in work:
            lr = self.lr(group)
            etas[id(group)] = lr if ratio > lr else ratio
        self.last_step_sizes = list(etas.values())
        for part in reversed(parts):  # from the tensors the first pass read last, still in the cache
            eta, decay = etas[id(part.group)], part.group["weight_decay"]
            self.run_pass(part, type(self).descend, dict(eta=eta, decay_factor=1.0 - eta * decay),
                          decayed=decay != 0, reverse=True)
        return loss
