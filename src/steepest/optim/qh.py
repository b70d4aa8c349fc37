"""Quasi-hyperbolic momentum: QHM and QHAdam."""

from __future__ import annotations

import math

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register


def _nus(name, value):
    """A pair of immediate-discount factors, each in [0, 1]."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a tuple of 2 numbers, each in [0, 1], got {value!r}")
    for i, nu in enumerate(value):
        checks.probability(f"{name}[{i}]", nu)


_nus.bad_example = (1.5, 1.0)

_PAPER = "Ma & Yarats 2019, Quasi-hyperbolic momentum and Adam for deep learning"


def qhm_update(params, grads, momentum_buffer, *, lr, momentum, nu, wd, wd_type="grad"):
    """b <- beta b + (1-beta) g;  p <- p - lr [(1-nu) g + nu b]  (weight decay as qhoptim applies it)."""
    if wd_type == "grad":
        grads = mt.add(grads, params, alpha=wd)
    elif wd_type == "direct":
        mt.mul_(params, 1.0 - lr * wd)
    mt.mul_(momentum_buffer, momentum)
    mt.add_(momentum_buffer, grads, 1.0 - momentum)
    mt.add_(params, momentum_buffer, -lr * nu)
    mt.add_(params, grads, -lr * (1.0 - nu))


@register("qhm", family="first-order", paper=_PAPER, arxiv="1810.06801",
          reference="qhoptim.pyt.QHM (facebookresearch/qhoptim)", state_words=1,
          example_kwargs={"lr": 0.5, "momentum": 0.9, "nu": 0.7},
          search_space={"lr": ("log", 1e-2, 10.0), "one_minus_momentum": ("log", 1e-3, 0.5),
                        "weight_decay": ("log", 1e-7, 1e-2)})
class QHM(Optimizer):
    """QHM: quasi-hyperbolic momentum (Ma & Yarats 2019, "Quasi-hyperbolic momentum and Adam for deep
    learning", ICLR 2019, arXiv 1810.06801).

        g_t = beta g_{t-1} + (1 - beta) grad_t   (g_0 = 0, dampened momentum)
        p <- p - lr [(1 - nu) grad_t + nu g_t]

    nu = 0 is plain SGD, nu = 1 is (dampened) momentum SGD; nu = beta with lr/(1-beta) is Nesterov.
    Because the momentum is dampened, momentum SGD with lr a corresponds to QHM with lr a/(1-beta).
    Weight decay as in the authors' qhoptim: ``weight_decay_type="grad"`` (default) adds wd p to the
    gradient (L2, as torch.optim.SGD); ``"direct"`` multiplies p by 1 - lr wd before the update.
    Defaults: lr 1e-3, momentum 0.999 and nu 0.7 (the paper's recommended pair; qhoptim has no defaults
    for these). State: momentum_buffer (1 word). Matches qhoptim.pyt.QHM step for step.
    """

    loads_stepless_state = True  # qhoptim counts no steps
    hyperparams = {"lr": checks.nonnegative, "momentum": checks.unit, "nu": checks.probability,
                   "weight_decay": checks.nonnegative, "weight_decay_type": checks.choice("grad", "direct")}
    weight_decay_mode = "custom"
    update = staticmethod(qhm_update)

    def __init__(self, params, lr=1e-3, momentum=0.999, nu=0.7, weight_decay=0.0, weight_decay_type="grad", *,
                 maximize=False, **engine):
        defaults = dict(lr=lr, momentum=momentum, nu=nu, weight_decay=weight_decay,
                        weight_decay_type=weight_decay_type, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"momentum_buffer": self.zeros_state(p)}

    def scalars(self, group, step):
        return dict(lr=self.lr(group), momentum=group["momentum"], nu=group["nu"], wd=group["weight_decay"])

    def static_options(self, group):
        return {"wd_type": group["weight_decay_type"] if group["weight_decay"] != 0 else "none"}


def qhadam_update(params, grads, exp_avg, exp_avg_sq, *, lr, w1, w2, nu1, nu2, eps, wd, wd_type="none",
                  nu1_one=False, nu2_one=False):
    """Bias-corrected EMAs m, v (weights w = (1-beta)/(1-beta^t)), then
    p <- p - lr [nu1 m + (1-nu1) g] / (sqrt(nu2 v + (1-nu2) g^2) + eps).

    With nu1 = 1 (nu2 = 1) the mix is m (v) itself, no pass for it. The second moments are scaled sums, as in the
    authors' code, not lerps: a float32 gradient above 1.8e19 squares to inf, and v then stays inf (the step 0),
    where a lerp from an infinite v is inf - inf = NaN."""
    if wd_type == "decoupled":
        mt.mul_(params, 1.0 - lr * wd)
    elif wd_type == "l2":
        grads = mt.add(grads, params, alpha=wd)
    mt.lerp_(exp_avg, grads, w1)
    mt.mul_(exp_avg_sq, 1.0 - w2)
    mt.addcmul_(exp_avg_sq, grads, grads, w2)
    avg_grad = exp_avg if nu1_one else mt.lerp(grads, exp_avg, nu1)
    if nu2_one:
        denom = mt.sqrt(exp_avg_sq)
    else:
        denom = mt.mul(exp_avg_sq, nu2)  # avg_rms
        mt.addcmul_(denom, grads, grads, 1.0 - nu2)
        mt.sqrt_(denom)
    mt.add_scalar_(denom, eps)
    mt.addcdiv_(params, avg_grad, denom, -lr)


def _steps_from_weight(weight: float, beta: float) -> int:
    """t with (1 - beta^t) / (1 - beta) = weight (qhoptim's running sum of beta^i, i < t); where beta^t is below
    what the weight resolves, a t whose power is as small (the bias corrections it gives are 1). With beta 0 every
    weight is 1 and every t gives the same corrections: 1."""
    if beta <= 0.0 or weight <= 1.0:
        return 1
    power = 1.0 - weight * (1.0 - beta)
    return max(int(round(math.log(max(power, 1e-300)) / math.log(beta))), 1)


@register("qhadam", family="first-order", paper=_PAPER, arxiv="1810.06801",
          reference="qhoptim.pyt.QHAdam (facebookresearch/qhoptim)", state_words=2,
          example_kwargs={"lr": 1e-2, "nus": (0.7, 1.0)},
          search_space={"lr": ("log", 1e-4, 1e-1), "one_minus_beta1": ("log", 4e-3, 0.1),
                        "weight_decay": ("log", 5e-3, 1.0)})
class QHAdam(Optimizer):
    """QHAdam: quasi-hyperbolic Adam (Ma & Yarats 2019, ICLR 2019, arXiv 1810.06801).

        m_t = bias-corrected EMA of g (beta1),  v_t = bias-corrected EMA of g^2 (beta2)
        p <- p - lr [(1 - nu1) g_t + nu1 m_t] / (sqrt((1 - nu2) g_t^2 + nu2 v_t) + eps)

    As in the authors' qhoptim, the stored moments are already bias-corrected (updated with weight
    (1-beta)/(1-beta^t), which equals Adam's m_t/(1-beta^t)), and eps is added after the square root of
    the mixed second moment, outside any bias correction. nus = (1, 1) is Adam with eps outside the
    corrected root (torch.optim.Adam's placement); QHAdam.from_nadam in qhoptim gives an NAdam-like pair.
    Weight decay: L2 (g <- g + wd p, also in g^2) by default as qhoptim; ``decoupled_weight_decay=True``
    multiplies p by 1 - lr wd first (qhoptim's ``decouple_weight_decay``, QHAdamW; that name is accepted too).
    Defaults: lr 1e-3, betas (0.9, 0.999), nus (1.0, 1.0) (qhoptim's; the paper suggests nus (0.7, 1.0) with
    betas (0.995, 0.999)), eps 1e-8. State: exp_avg, exp_avg_sq (2 words). Matches qhoptim.pyt.QHAdam.
    """

    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "nus": _nus,
                   "eps": checks.nonnegative, "weight_decay": checks.nonnegative,
                   "decoupled_weight_decay": checks.boolean}
    weight_decay_mode = "custom"
    package_group_names = {"decouple_weight_decay": "decoupled_weight_decay"}
    update = staticmethod(qhadam_update)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), nus=(1.0, 1.0), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, *, maximize=False, decouple_weight_decay=None, **engine):
        if decouple_weight_decay is not None:  # qhoptim's name for it
            checks.boolean("decouple_weight_decay", decouple_weight_decay)
            if decoupled_weight_decay and not decouple_weight_decay:
                raise ValueError("QHAdam: decouple_weight_decay (qhoptim's name) and decoupled_weight_decay disagree; "
                                 "give one of them")
            decoupled_weight_decay = decouple_weight_decay
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
                        nus=tuple(nus) if isinstance(nus, list) else nus, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}

    def from_package_state(self, state, group):
        """qhoptim counts no steps: it keeps the weights w_b = (1 - b^t) / (1 - b) whose inverses are this
        step's w1, w2; t is read back from the one of the beta closer to 1 (its powers resolve more steps)."""
        if "step" in state or "beta1_weight" not in state or "beta2_weight" not in state:
            return state
        state = dict(state)
        pairs = [(float(state.pop("beta1_weight")), group["betas"][0]), (float(state.pop("beta2_weight")),
                                                                        group["betas"][1])]
        weight, beta = max(pairs, key=lambda pair: pair[1])
        state["step"] = _steps_from_weight(weight, beta)
        return state

    def scalars(self, group, step):
        beta1, beta2 = group["betas"]
        nu1, nu2 = group["nus"]
        return dict(lr=self.lr(group), w1=(1.0 - beta1) / (1.0 - beta1**step), w2=(1.0 - beta2) / (1.0 - beta2**step),
                    nu1=nu1, nu2=nu2, eps=group["eps"], wd=group["weight_decay"])

    def static_options(self, group):
        nu1, nu2 = group["nus"]
        wd_type = "none" if group["weight_decay"] == 0 else "decoupled" if group["decoupled_weight_decay"] else "l2"
        return {"wd_type": wd_type, "nu1_one": nu1 == 1, "nu2_one": nu2 == 1}
