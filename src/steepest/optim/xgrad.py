"""XGrad: weight prediction wrapped around SGD-momentum, Adam and AdamW (Guan et al. 2023)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..core import checks
from ..core.base import Optimizer
from ..core.precision import as_real, working_copy
from ..core.registry import register
from .adam import Adam, AdamW
from .sgd import SGD

_STEPS_AHEAD = checks.integer(0)


@register("xgrad", family="wrapper",
          paper="Guan, Li, Shi & Meng 2023, XGrad: Boosting Gradient-Based Optimizers With Weight Prediction",
          arxiv="2305.18240", reference="guanleics/XGrad; NumPy transcription in tests/optim/test_xgrad.py",
          state_words=2, needs=("closure",), example_kwargs={"base": "adamw", "lr": 1e-2, "weight_decay": 1e-2},
          search_space={"lr": ("log", 1e-4, 1e-1), "one_minus_beta1": ("log", 4e-3, 0.1),
                        "weight_decay": ("log", 5e-3, 1.0)})
class XGrad(Optimizer):
    """XGrad: gradients taken at predicted future weights (Guan, Li, Shi & Meng 2023, "XGrad: Boosting
    Gradient-Based Optimizers With Weight Prediction", arXiv 2305.18240).

    ``XGrad(params, base="adamw", steps_ahead=1, **base_kwargs)`` wraps steepest's ``SGD`` (with
    momentum), ``Adam`` or ``AdamW`` (``base="sgd" | "adam" | "adamw"``; the other keyword arguments are
    the base optimizer's, with its defaults). Each ``step(closure)``:

    1. caches the weights x_t and predicts s = ``steps_ahead`` steps ahead with the base optimizer's
       current update direction (from its state after the previous step):
         SGD-momentum:  x_hat = x_t - s lr b_t                       (b the momentum buffer)
         Adam:          x_hat = x_t - s lr m_t/(1-b1^t) / (sqrt(v_t/(1-b2^t)) + eps)
         AdamW:         x_hat = x_t - s lr [m_t/(1-b1^t) / (sqrt(v_t/(1-b2^t)) + eps) + wd x_t]
       (amsgrad uses max v); at the first step there is no state and x_hat = x_t;
    2. runs the closure (forward and backward) at x_hat, so the gradients are those of the future weights;
    3. restores x_t exactly and applies the base optimizer's update with those gradients.

    The returned loss is the one at x_hat. ``steps_ahead=0`` is the base optimizer itself. L2 weight
    decay (SGD, Adam) is already inside the moments; AdamW's decoupled decay is part of its direction,
    as in the paper's AdamW formula (the authors' AdamW.py omits the wd x_t term of the prediction).
    SGD needs momentum > 0 (the prediction reads the momentum buffer) and no Nesterov. The instance is
    of a subclass per base (``XGradAdamW`` ...), so state_dict, param groups, schedulers and compile
    behave as the base's. State: the base optimizer's (AdamW: 2 words).
    """

    base_cls: ClassVar[type[Optimizer]] = AdamW
    base_name: ClassVar[str] = "adamw"
    hyperparams = {**AdamW.hyperparams, "steps_ahead": _STEPS_AHEAD}
    needs_closure = True
    _variants: ClassVar[dict[str, type]] = {}

    def __new__(cls, *args: Any, base: str = "adamw", **kwargs: Any):
        if cls is XGrad:
            if not isinstance(base, str) or base.lower() not in XGrad._variants:
                raise ValueError(f"XGrad: base must be one of {sorted(XGrad._variants)}, got {base!r}")
            cls = XGrad._variants[base.lower()]
        return super().__new__(cls)

    def __init__(self, params, base: str = "adamw", steps_ahead: int = 1, **base_kwargs: Any) -> None:
        self._steps_ahead_default = steps_ahead
        self._base_init(params, **base_kwargs)
        self.base = self.base_name

    def _check_hyperparams(self, group, where):
        if "steps_ahead" not in group:
            group = {**group, "steps_ahead": self._steps_ahead_default}
        super()._check_hyperparams(group, where)

    def add_param_group(self, param_group):
        self.defaults.setdefault("steps_ahead", self._steps_ahead_default)
        super().add_param_group(param_group)

    def _base_init(self, params, **kwargs):
        self.base_cls.__init__(self, params, **kwargs)

    # ----------------------------------------------------------------------------- prediction
    def _direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The base optimizer's current update direction (the step is x <- x - lr * direction)."""
        raise NotImplementedError

    @torch.no_grad()
    def _predict(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Move every parameter with state to its predicted weights; returns (param, cached copy) pairs."""
        cache = []
        for group in self.param_groups:
            s = group.get("steps_ahead", 0)
            params = [p for p in group["params"] if self.state.get(p)]
            if s == 0 or not params:
                continue
            direction = self._direction(group, params)
            alpha = -s * self.lr(group)
            for p, d in zip(params, direction):
                cache.append((p, p.detach().clone()))
                w = working_copy(as_real(p))
                w = w + d * alpha
                as_real(p).copy_(w)
        return cache

    @torch.no_grad()
    def step(self, closure=None):
        """Predict the weights, evaluate ``closure`` (forward + backward) there, restore, update."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that re-evaluates the model and calls "
                             f"backward (step(closure)): XGrad computes the gradients at predicted weights")
        self.check_state_shapes()
        cache = self._predict()
        try:
            loss = self.call_closure(closure)
        finally:
            for p, saved in cache:
                p.copy_(saved)
        return self._step_on_grads(loss)


def _state(opt, params, key):
    return [working_copy(as_real(opt.state[p][key])) for p in params]


class XGradSGD(XGrad, SGD):
    __doc__ = XGrad.__doc__
    base_cls = SGD
    base_name = "sgd"
    hyperparams = {**SGD.hyperparams, "steps_ahead": _STEPS_AHEAD}

    def _base_init(self, params, **kwargs):
        if kwargs.get("momentum", 0.0) == 0:
            raise ValueError("XGrad(base='sgd') needs momentum > 0: the weight prediction reads the momentum buffer")
        if kwargs.get("nesterov", False):
            raise ValueError("XGrad(base='sgd') supports heavy-ball momentum only (nesterov=False), as the paper")
        super()._base_init(params, **kwargs)

    def add_param_group(self, param_group):
        if isinstance(param_group, dict) and param_group.get("momentum", self.defaults.get("momentum")) == 0:
            raise ValueError("XGrad(base='sgd'): momentum must be > 0 in every param group")
        super().add_param_group(param_group)

    def _direction(self, group, params):
        if group["momentum"] == 0:
            raise ValueError("XGrad(base='sgd'): a param group's momentum was set to 0; the weight prediction reads "
                             "the momentum buffer, so momentum must stay > 0 in every param group")
        return _state(self, params, "momentum_buffer")


def _adam_direction(opt, group, params, decoupled):
    beta1, beta2 = group["betas"]
    out = []
    for p in params:
        state = opt.state[p]
        step = state["step"]
        m = working_copy(as_real(state["exp_avg"]))
        # amsgrad switched on since the last step: its max over no earlier v is this v.
        v = state.get("max_exp_avg_sq", state["exp_avg_sq"]) if group["amsgrad"] else state["exp_avg_sq"]
        v = working_copy(as_real(v))
        d = m / (1.0 - beta1**step) / (v.sqrt() / math.sqrt(1.0 - beta2**step) + group["eps"])
        if decoupled and group["weight_decay"] != 0:
            d = d + working_copy(as_real(p)) * group["weight_decay"]
        out.append(d)
    return out


class XGradAdam(XGrad, Adam):
    __doc__ = XGrad.__doc__
    base_cls = Adam
    base_name = "adam"
    hyperparams = {**Adam.hyperparams, "steps_ahead": _STEPS_AHEAD}

    def _direction(self, group, params):
        return _adam_direction(self, group, params, decoupled=group["decoupled_weight_decay"])


class XGradAdamW(XGrad, AdamW):
    __doc__ = XGrad.__doc__
    base_cls = AdamW
    base_name = "adamw"
    hyperparams = {**AdamW.hyperparams, "steps_ahead": _STEPS_AHEAD}

    def _direction(self, group, params):
        return _adam_direction(self, group, params, decoupled=True)


XGrad._variants.update({"sgd": XGradSGD, "adam": XGradAdam, "adamw": XGradAdamW})
