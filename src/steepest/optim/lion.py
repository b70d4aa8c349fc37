"""Lion: evolved sign momentum (Chen et al. 2023)."""

from __future__ import annotations

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register


def lion_update(params, grads, exp_avg, *, lr, beta1, beta2):
    """c = b1 m + (1-b1) g; p <- p - lr sign(c); m <- b2 m + (1-b2) g."""
    direction = mt.lerp(exp_avg, grads, 1.0 - beta1)
    mt.sign_(direction)
    mt.add_(params, direction, -lr)
    mt.lerp_(exp_avg, grads, 1.0 - beta2)


@register("lion", family="first-order",
          paper="Chen et al. 2023, Symbolic Discovery of Optimization Algorithms", arxiv="2302.06675",
          reference="google/automl lion/lion_pytorch.py; lion-pytorch on PyPI", state_words=1,
          example_kwargs={"lr": 1e-3, "weight_decay": 1e-1},
          search_space={"lr": ("log", 3e-5, 3e-2), "one_minus_beta1": ("log", 1e-2, 0.2),
                        "weight_decay": ("log", 1e-2, 10.0)})
class Lion(Optimizer):
    """Lion, EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms",
    arXiv 2302.06675), as the authors' google/automl lion/lion_pytorch.py::

        c_t = b1 m_{t-1} + (1-b1) g_t
        p  <- p (1 - lr wd) - lr sign(c_t)
        m_t = b2 m_{t-1} + (1-b2) g_t

    Defaults (the paper's): lr 1e-4, betas (0.9, 0.99), weight_decay 0. Weight decay is decoupled and
    scaled by lr, as the paper and authors' code (the paper advises an lr 3-10x smaller and a weight decay
    3-10x larger than AdamW's). State: exp_avg (1 word). sign(0) = 0, so a coordinate whose c_t is exactly
    zero does not move. Complex parameters are treated as pairs of reals (the sign of each part), where
    lion-pytorch takes z/|z|.
    """

    loads_stepless_state = True  # lion-pytorch counts no steps
    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "weight_decay": checks.nonnegative}
    weight_decay_mode = "decoupled"
    update = staticmethod(lion_update)

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
                        weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"exp_avg": self.zeros_state(p)}

    def scalars(self, group, step):
        beta1, beta2 = group["betas"]
        return dict(lr=self.lr(group), beta1=beta1, beta2=beta2)
