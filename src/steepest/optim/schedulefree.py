"""Schedule-Free SGD and AdamW (Defazio et al. 2024, "The Road Less Scheduled").

Named so as not to shadow the authors' package: import ours as ``steepest.SGDScheduleFree`` or
``from steepest.optim.schedulefree import AdamWScheduleFree``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.precision import write_back_
from ..core.registry import register


def _beta1_check(name: str, value: Any) -> None:
    checks.real(0.0, 1.0, lo_open=True, hi_open=True)(name, value)


_beta1_check.bad_example = 0.0


def _betas_check(name: str, value: Any) -> None:
    checks.betas(2)(name, value)
    if not value[0] > 0:
        raise ValueError(f"{name}[0] must lie in (0, 1): schedule-free recovers x from y and z by dividing by it; "
                         f"got {value[0]!r}")


_betas_check.bad_example = (1.5, 0.999)


def _sf_step(y, g, z, lr, ckp1, y_coef, denom=None):
    """y <- (1-c) y + c z + y_coef g, y_coef = lr (beta (1-c) - 1); z <- z - lr g (y holds the params).

    With ``denom``, g / denom takes g's place, read as a quotient in both updates (no temporary for it)."""
    mt.lerp_(y, z, ckp1)
    if denom is None:
        mt.add_(y, g, y_coef)
        mt.add_(z, g, -lr)
    else:
        mt.addcdiv_(y, g, denom, y_coef)
        mt.addcdiv_(z, g, denom, -lr)


def sgd_schedulefree_update(params, grads, z, *, lr, ckp1, y_coef, weight_decay, decay=False):
    """Schedule-Free SGD: L2 weight decay evaluated at y, then the y/z step."""
    if decay:
        grads = mt.add(grads, params, alpha=weight_decay)
    _sf_step(params, grads, z, lr, ckp1, y_coef)


def adamw_schedulefree_update(params, grads, z, exp_avg_sq, *, lr, ckp1, y_coef, beta2, scaled_eps, weight_decay,
                              inv_weight_decay=0.0, decay=False, fold_decay=False):
    """Schedule-Free AdamW: g / (sqrt(v / bc2) + eps), plus wd y (decay at y), then the y/z step.

    Written g / (sqrt(v) + scaled_eps) + (wd / sqrt(bc2)) y with lr and y_coef multiplied by sqrt(bc2) and
    scaled_eps = eps sqrt(bc2) (``scalars``): the same step without a pass dividing v by bc2."""
    mt.mul_(exp_avg_sq, beta2)
    mt.addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
    denom = mt.sqrt(exp_avg_sq)
    mt.add_scalar_(denom, scaled_eps)
    if fold_decay:
        # d / wd = y + g / (wd denom), one pass over the denominator's buffer (two for g / denom, then + wd y); the
        # step takes it with lr and y_coef times wd. Eager 0.931x the two passes' step time (16.8M params).
        mt.addcdiv_over_(denom, params, grads, inv_weight_decay)
        _sf_step(params, denom, z, lr * weight_decay, ckp1, y_coef * weight_decay)
    elif decay:
        mt.rdiv_(denom, grads)
        normalized = denom  # g / denom, over the temporary
        mt.add_(normalized, params, weight_decay)
        _sf_step(params, normalized, z, lr, ckp1, y_coef)
    else:  # the normalised gradient as a quotient: one eager pass fewer
        _sf_step(params, grads, z, lr, ckp1, y_coef, denom)


class _ScheduleFree(Optimizer):
    """Shared machinery: the averaging weights, train()/eval(), and the train-mode check."""

    weight_decay_mode = "custom"
    loads_stepless_state = True  # the schedulefree package counts steps in its groups (k)
    _GROUP_STATE = {"k": 0, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0}

    def __init__(self, params, defaults, **engine) -> None:
        self._current: dict[str, float] = {}
        super().__init__(params, defaults, **engine)

    @staticmethod
    def beta(group: dict[str, Any]) -> float:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; it starts in the mode the optimizer is in (train, for a new optimizer)."""
        mode = self.param_groups[0]["train_mode"] if self.param_groups else True
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key, value in self._GROUP_STATE.items():
            group.setdefault(key, value)
        group.setdefault("train_mode", mode)

    @torch.no_grad()
    def eval(self) -> None:
        """Set the params to x, the averaged point where the method's guarantees hold (evaluate, save here)."""
        self._swap(train=False)

    @torch.no_grad()
    def train(self) -> None:
        """Set the params to y, the point gradients are taken at (call before training steps)."""
        self._swap(train=True)

    def _swap(self, train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            beta = self.beta(group)
            weight = 1.0 - beta if train else 1.0 - 1.0 / beta
            for p in group["params"]:
                z = self.state[p].get("z")
                if z is None:
                    continue
                if z.dtype == p.dtype and z.device == p.device:
                    p.lerp_(z, weight)
                else:
                    dtype = torch.promote_types(p.dtype, z.dtype)
                    work = p.to(dtype).lerp_(z.to(device=p.device, dtype=dtype), weight)
                    write_back_(p, work, self.stochastic_rounding)
            group["train_mode"] = train

    def step(self, closure=None):
        """One step at y; the optimizer must be in train mode (call ``train()`` after ``eval()``)."""
        for gi, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise RuntimeError(f"{type(self).__name__}.step: param group {gi} is in eval mode (params hold "
                                   f"the average x); call optimizer.train() before training steps")
        return super().step(closure)

    def _step_group(self, group: dict[str, Any], params: list) -> None:
        k = group["k"]
        warmup = group["warmup_steps"]
        lr = self.lr(group) * ((k + 1) / warmup if k < warmup else 1.0)
        lr_max = max(lr, group["lr_max"])
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = group["weight_sum"] + weight
        try:
            ckp1 = weight / weight_sum
        except ZeroDivisionError:
            ckp1 = 0.0
        beta = self.beta(group)
        self._current = dict(lr=lr, ckp1=ckp1, y_coef=lr * (beta * (1 - ckp1) - 1), k=k)
        group.update(k=k + 1, lr_max=lr_max, weight_sum=weight_sum, scheduled_lr=lr)
        super()._step_group(group, params)

    def init_state(self, p, group):
        z = torch.empty_like(p, dtype=self.state_dtype_for(p), memory_format=torch.preserve_format).copy_(p)
        return {"z": z}

    def static_options(self, group):
        return {"decay": group["weight_decay"] != 0}


_SF_DOC_COMMON = """
    Schedule-Free (Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky 2024, "The Road Less
    Scheduled", arXiv 2405.15682), as the authors' package ``schedulefree`` 1.4.1. Three sequences:
    z (the base method's iterate), x (a weighted average of z: where the guarantees hold) and
    y = (1-beta) z + beta x, where gradients are taken. The params hold y in train mode and x in eval
    mode; z is the state. With lr_t = lr min(1, (t+1)/warmup_steps) (warmup inside the optimizer: no
    scheduler), lr_max = max_i lr_i, weight w_t = (t+1)^r lr_max^weight_lr_power and
    c_{t+1} = w_t / sum_{i<=t} w_i, each step (t counted per param group)

        y <- (1-c) y + c z + lr_t (beta (1-c) - 1) d;    z <- z - lr_t d

    which is x <- (1-c) x + c z_new written for y, with d the base method's direction.

    Call ``opt.train()`` before training steps and ``opt.eval()`` before evaluating or saving a
    checkpoint (``eval`` sets params to x = y + (1 - 1/beta)(z - y), ``train`` back to y). A new
    optimizer starts in train mode (before the first step x = y = z, so the modes coincide); step()
    in eval mode raises. BatchNorm: running statistics collected during training belong to y, not x.
    Before evaluating, recompute them at x: ``opt.eval()``, ``model.train()``, reset the BN running
    stats, run a few batches forward under ``torch.no_grad()``, then ``model.eval()`` (the authors'
    advice); or use a model without batch statistics. z is an iterate, not a moment: under
    ``state_dtype=torch.bfloat16`` its rounding is a sizeable part of a step (params measured 25% of
    their 5-step change off the float32-state run's, where most methods stay within 1.2%); the package
    keeps z at the param dtype.
"""


@register("sgd_schedulefree", family="schedule-free",
          paper="Defazio et al. 2024, The Road Less Scheduled", arxiv="2405.15682",
          reference="schedulefree 1.4.1 (SGDScheduleFree)", state_words=1,
          example_kwargs={"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3, "warmup_steps": 2},
          search_space={"lr": ("log", 0.05, 20.0), "weight_decay": ("log", 1e-7, 1e-2)})
class SGDScheduleFree(_ScheduleFree):
    __doc__ = ("Schedule-Free SGD: d = g + wd y (L2 weight decay at y), beta = ``momentum``.\n" + _SF_DOC_COMMON + """
    Defaults (the package's): lr 1.0, momentum 0.9, weight_decay 0, warmup_steps 0, r 0,
    weight_lr_power 2. State: z (1 word); k, weight_sum, lr_max, scheduled_lr and train_mode live in
    the param group, as in the package. Differences from the package: starts in train mode (the package
    starts in eval mode and requires train() first); p.grad is never modified (the package adds the
    weight decay into it).
    """)

    hyperparams = {"lr": checks.nonnegative, "momentum": _beta1_check, "weight_decay": checks.nonnegative,
                   "warmup_steps": checks.integer(0), "r": checks.nonnegative,
                   "weight_lr_power": checks.nonnegative}
    update = staticmethod(sgd_schedulefree_update)

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0,
                 *, maximize=False, **engine):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, maximize=maximize)
        super().__init__(params, defaults, **engine)

    @staticmethod
    def beta(group):
        return group["momentum"]

    def scalars(self, group, step):
        c = self._current
        return dict(lr=c["lr"], ckp1=c["ckp1"], y_coef=c["y_coef"], weight_decay=group["weight_decay"])


@register("adamw_schedulefree", family="schedule-free",
          paper="Defazio et al. 2024, The Road Less Scheduled", arxiv="2405.15682",
          reference="schedulefree 1.4.1 (AdamWScheduleFree)", state_words=2,
          example_kwargs={"lr": 1e-2, "weight_decay": 1e-2, "warmup_steps": 2},
          search_space={"lr": ("log", 3e-4, 3e-2), "weight_decay": ("log", 5e-3, 1.0)})
class AdamWScheduleFree(_ScheduleFree):
    __doc__ = ("Schedule-Free AdamW: v = b2 v + (1-b2) g^2, d = g / (sqrt(v / (1-b2^(t+1))) + eps) + wd y\n"
               "    (decoupled weight decay evaluated at y, scaled by lr_t through the step), beta = b1.\n"
               + _SF_DOC_COMMON + """
    Defaults (the package's): lr 0.0025, betas (0.9, 0.999), eps 1e-8, weight_decay 0, warmup_steps 0,
    r 0, weight_lr_power 2. State: z, exp_avg_sq (2 words); k, weight_sum, lr_max, scheduled_lr and
    train_mode live in the param group. Differences from the package: starts in train mode (the package
    starts in eval mode and requires train() first); betas[0] must be > 0 (eval() divides by it);
    p.grad is never modified (the package normalizes it in place).
    """)

    hyperparams = {"lr": checks.nonnegative, "betas": _betas_check, "eps": checks.positive,
                   "weight_decay": checks.nonnegative, "warmup_steps": checks.integer(0), "r": checks.nonnegative,
                   "weight_lr_power": checks.nonnegative}
    update = staticmethod(adamw_schedulefree_update)

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)

    @staticmethod
    def beta(group):
        return group["betas"][0]

    def init_state(self, p, group):
        return {**super().init_state(p, group), "exp_avg_sq": self.zeros_state(p)}

    def scalars(self, group, step):
        c = self._current
        beta2 = group["betas"][1]
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** (c["k"] + 1))
        weight_decay = group["weight_decay"] / bias_correction2_sqrt
        return dict(lr=c["lr"] * bias_correction2_sqrt, ckp1=c["ckp1"], y_coef=c["y_coef"] * bias_correction2_sqrt,
                    beta2=beta2, scaled_eps=group["eps"] * bias_correction2_sqrt, weight_decay=weight_decay,
                    inv_weight_decay=1.0 / weight_decay if self.static_options(group)["fold_decay"] else 0.0)

    def static_options(self, group):
        # The folded form divides by wd: kept to weight decays whose inverse times a normalised gradient (|g/denom|
        # <= ~1/sqrt(1-b2)) stays far inside float32's range.
        return {**super().static_options(group), "fold_decay": group["weight_decay"] >= 1e-20}
