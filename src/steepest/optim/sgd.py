"""Stochastic gradient descent with momentum, dampening and Nesterov momentum."""

from __future__ import annotations

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register


def sgd_update(params, grads, momentum_buffer=None, *, lr, momentum, grad_scale, nesterov=False, nesterov_coef=0.0):
    """b <- momentum b + grad_scale g; d = g + mu b (Nesterov) or b; p <- p - lr d."""
    if momentum_buffer is None:
        mt.add_(params, grads, -lr)
        return
    mt.mul_(momentum_buffer, momentum)
    mt.add_(momentum_buffer, grads, grad_scale)
    direction = mt.add(grads, momentum_buffer, nesterov_coef) if nesterov else momentum_buffer
    mt.add_(params, direction, -lr)


@register("sgd", family="first-order", paper="Robbins & Monro 1951; Polyak 1964; Nesterov 1983 (classical)",
          arxiv="", reference="torch.optim.SGD", state_words=1,
          example_kwargs={"lr": 0.05, "momentum": 0.9, "nesterov": True},
          search_space={"lr": ("log", 2e-2, 5.0), "one_minus_momentum": ("log", 1e-3, 0.5),
                        "weight_decay": ("log", 1e-7, 1e-2)})
class SGD(Optimizer):
    """SGD with momentum (Polyak 1964), dampening and Nesterov momentum (Sutskever et al. 2013).

    b_1 = g_1;  b_t = momentum b_{t-1} + (1 - dampening) g_t;  d = g + momentum b (nesterov) or b;
    p <- p - lr d. Weight decay is L2 (g <- g + wd p), as torch.optim.SGD. Defaults: lr 1e-3,
    momentum 0. State: momentum_buffer (1 word when momentum > 0, else none). A momentum schedule may start at
    or pass through 0, as with torch.optim.SGD: the buffer is created (b = g) when momentum turns nonzero and
    waits, unchanged, while it is 0; the step count then counts the buffer's updates.
    """

    hyperparams = {"lr": checks.nonnegative, "momentum": checks.nonnegative, "dampening": checks.real(0.0, 1.0),
                   "weight_decay": checks.nonnegative, "nesterov": checks.boolean}
    weight_decay_mode = "l2"
    update = staticmethod(sgd_update)
    loads_stepless_state = True  # torch.optim.SGD's state_dicts
    optional_states = {"momentum_buffer": lambda group: group["momentum"] != 0}

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, **engine):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov=True needs momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"momentum_buffer": self.zeros_state(p)} if group["momentum"] != 0 else {}

    def optional_states_added(self, state, keys):
        # The step count says when the buffer is new: a buffer created once momentum turns nonzero starts as
        # b = g, as torch.optim.SGD's (which counts no steps).
        state["step"] = 0

    def scalars(self, group, step):
        momentum = group["momentum"]
        # The first step sets b_1 = g_1: a zero buffer times 0 plus 1 * g is that copy, exactly.
        first = step == 1
        return dict(lr=self.lr(group), momentum=0.0 if first else momentum,
                    grad_scale=1.0 if first else 1.0 - group["dampening"], nesterov_coef=momentum)

    def static_options(self, group):
        return {"nesterov": group["nesterov"]}
