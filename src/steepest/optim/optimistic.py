"""Optimistic AMSGrad (Wang, Li, Li 2019): AMSGrad with an extra step along a guess of the next gradient."""

from __future__ import annotations

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.precision import as_real
from ..core.registry import register


def optimistic_amsgrad_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, half_point, *, lr, beta1,
                              beta2):
    """theta <- b1 theta + (1-b1) g; v <- b2 v + (1-b2) g^2; vhat <- max(vhat, v);
    w_half <- w_half - lr theta / sqrt(vhat);  w <- w_half - lr h / sqrt(vhat), with the guess
    m_{t+1} = g_t, so that h_{t+1} = b1 theta_{t-1} + (1-b1) g_t = theta_t."""
    mt.lerp_(exp_avg, grads, 1.0 - beta1)
    mt.mul_(exp_avg_sq, beta2)
    mt.addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
    mt.maximum_(max_exp_avg_sq, exp_avg_sq)
    denom = mt.sqrt(max_exp_avg_sq)
    mt.rdiv_(denom, exp_avg)
    step = denom  # theta / sqrt(vhat), over the temporary
    mt.add_(half_point, step, -lr)
    mt.copy_(params, half_point)
    mt.add_(params, step, -lr)


@register("optimistic_amsgrad", family="first-order",
          paper="Wang, Li, Li 2019, Optimistic Adaptive Acceleration for Optimization (An Optimistic Acceleration "
                "of AMSGrad for Nonconvex Optimization)", arxiv="1903.01435",
          reference="paper Algorithm (Optimistic-AMSGrad) with the last gradient as the guess; float64 NumPy "
                    "transcription in the tests",
          state_words=4, example_kwargs={"lr": 1e-2},
          search_space={"lr": ("log", 1e-4, 1e-1), "one_minus_beta1": ("log", 4e-3, 0.1)})
class OptimisticAMSGrad(Optimizer):
    """Optimistic-AMSGrad (Wang, Li, Li 2019, "Optimistic Adaptive Acceleration for Optimization";
    revised as "An Optimistic Acceleration of AMSGrad for Nonconvex Optimization", arXiv 1903.01435).

    The paper's algorithm, with w_{-1/2} = w_1 (the parameter at the first step) and v_0 = vhat_0 = eps::

        theta_t = b1 theta_{t-1} + (1-b1) g_t;   v_t = b2 v_{t-1} + (1-b2) g_t^2;   vhat_t = max(vhat_{t-1}, v_t)
        w_{t+1/2} = w_{t-1/2} - lr theta_t / sqrt(vhat_t)
        w_{t+1}   = w_{t+1/2} - lr h_{t+1} / sqrt(vhat_t),   h_{t+1} = b1 theta_{t-1} + (1-b1) m_{t+1}

    where m_{t+1} is a guess of the next gradient g_{t+1}. The paper builds its guess by extrapolating the
    last few gradients (regularised minimal polynomial extrapolation); this implementation takes the
    simplest guess the paper's framework allows, the last gradient m_{t+1} = g_t, which needs no extra
    state and makes h_{t+1} = theta_t. The parameters hold w_t (where gradients are taken); the state
    keeps w_{t-1/2}. eps enters as the paper's v_0 = eps (inside the root, no eps added to the
    denominator); there is no bias correction, and no weight decay (the paper has none). The paper's
    second step uses lr_{t+1}; the current lr is used for both (the same for a constant lr).
    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8. State: exp_avg (theta), exp_avg_sq (v),
    max_exp_avg_sq (vhat), half_point (w_{t-1/2}): 4 words.
    """

    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "eps": checks.positive}
    weight_decay_mode = "custom"
    update = staticmethod(optimistic_amsgrad_update)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        v, half = self.zeros_state(p), self.zeros_state(p)
        if p.device.type != "meta":
            as_real(v).fill_(group["eps"])
            half.copy_(p.detach())
        vhat = v.clone()
        return {"exp_avg": self.zeros_state(p), "exp_avg_sq": v, "max_exp_avg_sq": vhat, "half_point": half}

    def scalars(self, group, step):
        beta1, beta2 = group["betas"]
        return dict(lr=self.lr(group), beta1=beta1, beta2=beta2)
