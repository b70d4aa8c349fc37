"""Generalized Polyak step size with momentum: ALR-SMAG (Wang, Johansson & Zhang 2023)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.precision import is_low_precision, write_back_
from ..core.registry import register

# Options that the single, global step size depends on: every param group must agree on them.
_GLOBAL = ("f_star", "c", "maximize")


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _work(t: torch.Tensor) -> torch.Tensor:
    return t.float() if is_low_precision(t.dtype) else t


@register("alr_smag", family="first-order",
          paper="Wang, Johansson & Zhang 2023, Generalized Polyak Step Size for First Order Optimization with "
                "Momentum", arxiv="2305.12939",
          reference="paper equations (NumPy transcription in tests/optim/test_polyak.py); cf. Schaipp's "
                    "step-back AlrSmag", state_words=1,
          needs=("closure",), example_kwargs={"lr": 0.1, "momentum": 0.9},
          conformance_skip={
              "compile": "the step size couples every tensor through the global norm of the momentum and the "
                         "loss value, read on the host once per step; the step runs as eager for-each ops only, "
                         "so there is no compiled path to compare",
          },
          search_space={"lr": ("log", 1e-2, 10.0), "one_minus_momentum": ("log", 1e-2, 0.5),
                        "c": ("log", 0.2, 5.0)})
class ALRSMAG(Optimizer):
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
    After each step ``last_step_sizes`` holds eta_k of every param group.
    State: momentum_buffer d (1 word). The step always runs eager (``compile`` is accepted, unused).
    """

    hyperparams = {"lr": checks.nonnegative, "momentum": checks.unit, "f_star": checks.real(),
                   "c": checks.positive, "weight_decay": checks.nonnegative}
    weight_decay_mode = "custom"
    per_tensor = False
    needs_closure = True

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

    @torch.no_grad()
    def step(self, closure=None):
        """One step; ``closure`` must re-evaluate the model, call backward and return the loss."""
        if closure is None:
            raise ValueError("ALRSMAG.step needs a closure that re-evaluates the model and returns the loss "
                             "(step(closure)): the Polyak step size divides the loss gap f - f_star")
        with torch.enable_grad():
            loss = closure()
        work = self._collect()
        if not work:
            return loss
        if loss is None:
            raise ValueError("ALRSMAG: the closure returned None; it must return the loss f(x_k)")
        loss_value = float(loss)
        if self.skip_nonfinite and (not math.isfinite(loss_value) or not self._grads_finite(work)):
            self.skipped_steps += 1
            return loss

        # Phase 1: d <- momentum d + g for every tensor, and ||d||^2 over all of them.
        squares = []
        for group, params in work:
            for p in params:
                state = self.state[p]
                if not state:
                    state.update(self.init_state(p, group))
                    state["step"] = 0
                state["step"] += 1
            bufs = [_real(self.state[p]["momentum_buffer"]) for p in params]
            grads = [_work(_real(p.grad)) for p in params]
            if group["maximize"]:
                grads = mt.neg(grads)
            work_d = [_work(d) for d in bufs]
            mt.mul_(work_d, group["momentum"])
            mt.add_(work_d, grads)
            for d, w in zip(bufs, work_d):
                write_back_(d, w, self.stochastic_rounding)
            squares += [n.double() for n in mt.squared_norms([_work(d) for d in bufs])]
        sq = float(torch.stack([s.cpu() for s in squares]).sum())

        first = self.param_groups[0]
        gap = (first["f_star"] - loss_value) if first["maximize"] else (loss_value - first["f_star"])
        gap = max(gap, 0.0) if not math.isnan(gap) else gap
        if sq > 0:
            ratio = gap / (first["c"] * sq)
        else:
            ratio = math.inf if gap > 0 else (0.0 if gap == 0 else gap)

        # Phase 2: x <- x (1 - eta wd) - eta d, with eta = min(ratio, lr) per group.
        self.last_step_sizes = []
        for group, params in work:
            lr = self.lr(group)
            eta = lr if ratio > lr else ratio
            self.last_step_sizes.append(eta)
            bufs = [_work(_real(self.state[p]["momentum_buffer"])) for p in params]
            reals = [_real(p) for p in params]
            work_p = [_work(p) for p in reals]
            if group["weight_decay"] != 0:
                mt.mul_(work_p, 1.0 - eta * group["weight_decay"])
            mt.add_(work_p, bufs, -eta)
            for p, w in zip(reals, work_p):
                write_back_(p, w, self.stochastic_rounding)
        return loss
